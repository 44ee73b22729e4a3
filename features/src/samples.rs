//! Sample joining as ad systems do it: an impression is clicked when a click with its join key follows it within
//! the click window, and converts when one of its clicks is followed by a conversion with that click's id within
//! the conversion window. Duplicate clicks or conversions never duplicate an impression (a LEFT JOIN would).

use std::collections::HashMap;

use crate::view::Micros;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// How long after an impression its click still counts (inclusive).
    pub click: Micros,
    /// How long after a click its conversion still counts (inclusive).
    pub conversion: Micros,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    pub click: bool,
    pub convert: bool,
}

/// A click: the impression key it answers, its own id (what conversions name) and its time.
#[derive(Clone, Debug, PartialEq)]
pub struct Click<'a> {
    pub impression_key: &'a str,
    pub click_id: &'a str,
    pub time: Micros,
}

/// Labels of each impression `(key, time)`, in order.
pub fn label_impressions(
    impressions: &[(&str, Micros)],
    clicks: &[Click<'_>],
    conversions: &[(&str, Micros)],
    windows: Windows,
) -> Vec<Labels> {
    let mut conversions_by_click: HashMap<&str, Vec<Micros>> = HashMap::new();
    for &(click_id, time) in conversions {
        conversions_by_click.entry(click_id).or_default().push(time);
    }
    let mut clicks_by_key: HashMap<&str, Vec<&Click<'_>>> = HashMap::new();
    for click in clicks {
        clicks_by_key
            .entry(click.impression_key)
            .or_default()
            .push(click);
    }
    let within = |from: Micros, to: Micros, window: Micros| to >= from && to - from <= window;
    impressions
        .iter()
        .map(|&(key, shown)| {
            let attributed = clicks_by_key
                .get(key)
                .into_iter()
                .flatten()
                .filter(|click| within(shown, click.time, windows.click));
            let mut labels = Labels::default();
            for click in attributed {
                labels.click = true;
                labels.convert |= conversions_by_click
                    .get(click.click_id)
                    .is_some_and(|times| {
                        times
                            .iter()
                            .any(|&t| within(click.time, t, windows.conversion))
                    });
            }
            labels
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOWS: Windows = Windows {
        click: 100,
        conversion: 1_000,
    };

    fn click<'a>(key: &'a str, id: &'a str, time: Micros) -> Click<'a> {
        Click {
            impression_key: key,
            click_id: id,
            time,
        }
    }

    #[test]
    fn click_window_edges() {
        let impressions = [("a", 0), ("b", 0), ("c", 0), ("d", 50)];
        let clicks = [
            click("a", "ca", 100), // exactly at the window's end: counts
            click("b", "cb", 101), // one tick late
            click("d", "cd", 49),  // before its impression
        ];
        let labels = label_impressions(&impressions, &clicks, &[], WINDOWS);
        let clicked: Vec<bool> = labels.iter().map(|l| l.click).collect();
        assert_eq!(clicked, [true, false, false, false]);
    }

    #[test]
    fn conversion_window_edges_and_no_duplicates() {
        let impressions = [("a", 0), ("b", 0), ("c", 0)];
        let clicks = [
            click("a", "ca", 10),
            click("a", "ca", 10), // a duplicate click
            click("b", "cb", 10),
            click("c", "cc", 10),
        ];
        let conversions = [("ca", 1_010), ("ca", 1_010), ("cb", 1_011), ("cc", 5)];
        let labels = label_impressions(&impressions, &clicks, &conversions, WINDOWS);
        assert_eq!(labels.len(), 3, "one row per impression");
        assert_eq!(
            labels,
            [
                Labels {
                    click: true,
                    convert: true
                },
                Labels {
                    click: true,
                    convert: false
                },
                Labels {
                    click: true,
                    convert: false
                },
            ]
        );
    }

    #[test]
    fn a_conversion_needs_an_attributed_click() {
        // The click is outside the click window, so its conversion does not label the impression either.
        let labels = label_impressions(
            &[("a", 0)],
            &[click("a", "ca", 500)],
            &[("ca", 600)],
            WINDOWS,
        );
        assert_eq!(labels, [Labels::default()]);
    }
}
