//! A seeded synthetic CTR data set: users, ads (items) in categories, context (hour, device), timestamps, and
//! clicks drawn from known true probabilities. Because the true probability of every impression is known, the
//! generator also reports the Bayes-optimal AUC of its own data: the best any model can reach on it.

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Normal};

use crate::metrics::auc;
use crate::schema::{FeatureSchema, FeatureSpec, ValueType};
use crate::transform::{Transform, Value};

#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    pub seed: u64,
    pub users: u32,
    pub items: u32,
    pub categories: u32,
    pub rows: usize,
    /// Dimension of the hidden user and item factors whose dot product drives clicks.
    pub latent_dim: usize,
    /// Unix seconds of the first impression; impressions spread evenly over `span_seconds`.
    pub start: i64,
    pub span_seconds: i64,
    /// Intercept of the true logit; −2 gives a click rate around 15%.
    pub base_logit: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 42,
            users: 10_000,
            items: 2_000,
            categories: 20,
            rows: 100_000,
            latent_dim: 4,
            start: 1_790_000_000,
            span_seconds: 14 * 86_400,
            base_logit: -2.0,
        }
    }
}

/// One ad impression and whether it was clicked.
#[derive(Clone, Debug, PartialEq)]
pub struct Impression {
    pub timestamp: i64,
    pub user_id: u32,
    pub item_id: u32,
    pub category: u32,
    pub age: u32,
    pub gender: &'static str,
    pub device: &'static str,
    pub hour: u32,
    pub price: f64,
    pub clicked: bool,
    /// The probability the click was drawn from.
    pub true_probability: f64,
}

#[derive(Clone, Debug)]
pub struct SyntheticData {
    pub impressions: Vec<Impression>,
    /// AUC of the true probabilities on the drawn clicks.
    pub bayes_auc: f64,
    pub click_rate: f64,
}

const GENDERS: [&str; 2] = ["f", "m"];
const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];

struct User {
    bias: f64,
    factors: Vec<f64>,
    age: u32,
    gender: usize,
}

struct Item {
    bias: f64,
    factors: Vec<f64>,
    category: u32,
    price: f64,
}

/// Generates the data set; the same config gives the same data on every machine.
pub fn generate(config: &SyntheticConfig) -> SyntheticData {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let bias = normal(0.5);
    let factor = normal(0.9 / (config.latent_dim.max(1) as f64).sqrt());
    let users: Vec<User> = (0..config.users.max(1))
        .map(|_| User {
            bias: bias.sample(&mut rng),
            factors: (0..config.latent_dim)
                .map(|_| factor.sample(&mut rng))
                .collect(),
            age: rng.random_range(18..70),
            gender: rng.random_range(0..GENDERS.len()),
        })
        .collect();
    let price = LogNormal::new(2.0, 1.0).unwrap_or_else(|_| unreachable_distribution());
    let categories = config.categories.max(1);
    let items: Vec<Item> = (0..config.items.max(1))
        .map(|_| Item {
            bias: bias.sample(&mut rng),
            factors: (0..config.latent_dim)
                .map(|_| factor.sample(&mut rng))
                .collect(),
            category: rng.random_range(0..categories),
            price: price.sample(&mut rng),
        })
        .collect();
    // How much each age band (4 bands) likes each category.
    let affinity: Vec<f64> = (0..categories * 4)
        .map(|_| normal(0.4).sample(&mut rng))
        .collect();
    let device_effect = [0.0, -0.3, 0.15];

    let mut impressions = Vec::with_capacity(config.rows);
    for row in 0..config.rows {
        let user_id = popular(&mut rng, users.len());
        let item_id = popular(&mut rng, items.len());
        let (user, item) = (&users[user_id], &items[item_id]);
        let timestamp =
            config.start + (row as i64 * config.span_seconds) / config.rows.max(1) as i64;
        let hour = ((timestamp.rem_euclid(86_400)) / 3600) as u32;
        let device = rng.random_range(0..DEVICES.len());
        let dot: f64 = user
            .factors
            .iter()
            .zip(&item.factors)
            .map(|(u, v)| u * v)
            .sum();
        let age_band = ((user.age - 18) / 13).min(3);
        let logit = config.base_logit
            + user.bias
            + item.bias
            + dot
            + affinity[(item.category * 4 + age_band) as usize]
            + 0.3 * (2.0 * std::f64::consts::PI * f64::from(hour) / 24.0).sin()
            + device_effect[device]
            - 0.15 * item.price.ln_1p();
        let true_probability = 1.0 / (1.0 + (-logit).exp());
        let clicked = rng.random::<f64>() < true_probability;
        impressions.push(Impression {
            timestamp,
            user_id: user_id as u32,
            item_id: item_id as u32,
            category: item.category,
            age: user.age,
            gender: GENDERS[user.gender],
            device: DEVICES[device],
            hour,
            price: item.price,
            clicked,
            true_probability,
        });
    }
    let probabilities: Vec<f64> = impressions.iter().map(|i| i.true_probability).collect();
    let labels: Vec<bool> = impressions.iter().map(|i| i.clicked).collect();
    let clicks = labels.iter().filter(|&&c| c).count();
    SyntheticData {
        bayes_auc: auc(&probabilities, &labels).unwrap_or(0.5),
        click_rate: clicks as f64 / labels.len().max(1) as f64,
        impressions,
    }
}

impl Impression {
    /// The raw value of a column, by the names of [`feature_schema`].
    pub fn value(&self, column: &str) -> Value<'_> {
        match column {
            "user_id" => Value::Int(i64::from(self.user_id)),
            "item_id" => Value::Int(i64::from(self.item_id)),
            "category" => Value::Int(i64::from(self.category)),
            "age" => Value::Int(i64::from(self.age)),
            "gender" => Value::Str(self.gender),
            "device" => Value::Str(self.device),
            "hour" => Value::Int(i64::from(self.hour)),
            "price" => Value::Float(self.price),
            _ => Value::Missing,
        }
    }
}

/// The feature schema of the generated columns, with `buckets` rows per hashed id table.
pub fn feature_schema(buckets: u64) -> FeatureSchema {
    let hashed = |name: &str, value_type| FeatureSpec {
        name: name.to_owned(),
        value_type,
        transform: Some(Transform::HashBucket { buckets }),
    };
    FeatureSchema {
        features: vec![
            hashed("user_id", ValueType::Int64),
            hashed("item_id", ValueType::Int64),
            hashed("category", ValueType::Int64),
            FeatureSpec {
                name: "age".into(),
                value_type: ValueType::Int64,
                transform: Some(Transform::Bucketize {
                    boundaries: vec![25.0, 31.0, 44.0, 57.0],
                }),
            },
            hashed("gender", ValueType::String),
            hashed("device", ValueType::String),
            FeatureSpec {
                name: "hour".into(),
                value_type: ValueType::Int64,
                transform: Some(Transform::Bucketize {
                    boundaries: (1..24).map(f64::from).collect(),
                }),
            },
            FeatureSpec {
                name: "price".into(),
                value_type: ValueType::Float64,
                transform: Some(Transform::Log1p {}),
            },
            FeatureSpec {
                name: "category_x_age".into(),
                value_type: ValueType::String,
                transform: Some(Transform::Cross {
                    features: vec!["category".into(), "age".into()],
                    buckets,
                }),
            },
        ],
    }
}

/// Skewed popularity: low indices are drawn far more often, as with real users and ads.
fn popular(rng: &mut impl Rng, count: usize) -> usize {
    let u: f64 = rng.random();
    ((u * u * count as f64) as usize).min(count - 1)
}

fn normal(std: f64) -> Normal<f64> {
    Normal::new(0.0, std).unwrap_or_else(|_| unreachable_distribution())
}

/// The parameters above are constants the distributions accept; this is never reached.
fn unreachable_distribution<T>() -> T {
    panic!("invalid constant distribution parameters")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> SyntheticConfig {
        SyntheticConfig {
            seed,
            users: 300,
            items: 100,
            rows: 5_000,
            ..SyntheticConfig::default()
        }
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let a = generate(&small(1));
        let b = generate(&small(1));
        let c = generate(&small(2));
        assert_eq!(a.impressions, b.impressions);
        assert_ne!(a.impressions, c.impressions);
    }

    #[test]
    fn clicks_follow_the_true_probabilities() {
        let data = generate(&small(7));
        let mean_probability: f64 = data
            .impressions
            .iter()
            .map(|i| i.true_probability)
            .sum::<f64>()
            / data.impressions.len() as f64;
        assert!(
            (data.click_rate - mean_probability).abs() < 0.02,
            "{} vs {mean_probability}",
            data.click_rate
        );
        assert!(
            data.click_rate > 0.05 && data.click_rate < 0.4,
            "{}",
            data.click_rate
        );
        assert!(
            data.bayes_auc > 0.65 && data.bayes_auc < 0.95,
            "{}",
            data.bayes_auc
        );
        assert!(
            data.impressions
                .windows(2)
                .all(|w| w[0].timestamp <= w[1].timestamp)
        );
    }

    #[test]
    fn generated_rows_encode_with_the_schema() {
        let schema = feature_schema(1000);
        assert_eq!(schema.validate(), Ok(()));
        let data = generate(&small(3));
        for impression in data.impressions.iter().take(100) {
            let row = schema.encode(|column| impression.value(column));
            assert!(
                matches!(row, Ok(ref r) if r.categorical.len() == 8 && r.numeric.len() == 1),
                "{row:?}"
            );
        }
    }
}
