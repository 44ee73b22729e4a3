//! A trained model survives the artifact round trip bit for bit, and damaged artifacts are refused with an
//! error, never a panic.

use burn::backend::{Autodiff, Flex};
use flywheel_ml::artifact::{self, ArtifactError, FORMAT, Lineage, ModelCard};
use flywheel_ml::model::{Architecture, ModelConfig};
use flywheel_ml::synthetic::{SyntheticConfig, feature_schema, generate};
use flywheel_ml::train::{EncodedDataset, TrainConfig, Trainer, predict};

type Cpu = Autodiff<Flex>;

fn trained() -> (Trainer<Cpu>, ModelCard, EncodedDataset) {
    let generated = generate(&SyntheticConfig {
        seed: 2,
        users: 200,
        items: 50,
        rows: 3_000,
        ..SyntheticConfig::default()
    });
    let schema = feature_schema(1_000);
    let data = EncodedDataset::encode(
        &schema,
        &generated.impressions,
        |r, c| r.value(c),
        |r| r.clicked,
        |r| u64::from(r.user_id),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    let model = ModelConfig {
        architecture: Architecture::DeepFm,
        embedding_dim: 4,
        hidden_layers: vec![8],
        fields: data.fields,
        numeric: data.numeric_width,
    };
    let config = TrainConfig {
        batch_size: 128,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::<Cpu>::new(model.clone(), config.clone(), Default::default());
    trainer.fit(&data, |_| {});
    let card = ModelCard {
        format: FORMAT.to_owned(),
        model,
        feature_schema_hash: schema.hash(),
        schema,
        training: config,
        metrics: trainer.evaluate(&data),
        lineage: Lineage {
            data: vec!["synthetic:seed=2".into()],
            train_rows: data.len(),
            eval_rows: data.len(),
            warm_start: None,
            feature_view: None,
        },
        code_version: "test".into(),
        step: trainer.step,
        calibrator: trainer.calibrator.clone(),
        convergence: None,
    };
    (trainer, card, data)
}

#[test]
fn round_trip_keeps_every_prediction() {
    let (trainer, card, data) = trained();
    let bytes = artifact::encode(&card, &trainer.model, &trainer.tables, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let saved =
        artifact::decode::<Flex>(&bytes, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(saved.card, card);
    let restored = predict(
        &saved.model,
        &saved.tables,
        saved.card.calibrator.as_ref(),
        &data,
        &Default::default(),
    );
    assert_eq!(restored, trainer.predict(&data));
}

#[test]
fn damaged_artifacts_are_refused() {
    let (trainer, card, _) = trained();
    let bytes = artifact::encode(&card, &trainer.model, &trainer.tables, true)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        artifact::decode::<Flex>(b"PK\x03\x04", &Default::default()),
        Err(ArtifactError::NotAModel)
    ));
    for cut in [5, 20, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            artifact::decode::<Flex>(&bytes[..cut], &Default::default()).is_err(),
            "cut at {cut}"
        );
    }
    let mut flipped = bytes.clone();
    flipped[14] ^= 0xff;
    assert!(artifact::decode::<Flex>(&flipped, &Default::default()).is_err());

    let dir = std::env::temp_dir().join(format!("flywheel-artifact-{}", std::process::id()));
    let path = dir.join("model.fwm");
    let digest = artifact::write_file(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        artifact::read_file(&path, Some(&digest))
            .map(|b| b.len())
            .ok(),
        Some(bytes.len())
    );
    let sidecar = std::fs::read_to_string(dir.join("model.fwm.sha256")).unwrap_or_default();
    assert_eq!(sidecar, format!("{digest}  model.fwm\n"));
    let wrong = "0".repeat(64);
    assert!(matches!(
        artifact::read_file(&path, Some(&wrong)),
        Err(ArtifactError::ShaMismatch { .. })
    ));
    for not_a_file in [std::path::Path::new("/dev/zero"), dir.as_path()] {
        assert!(matches!(
            artifact::read_file(not_a_file, None),
            Err(ArtifactError::NotAFile(_))
        ));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_checkpoint_with_one_flipped_bit_is_refused_not_resumed() {
    let (trainer, card, _) = trained();
    let bytes = trainer
        .checkpoint(&card, flywheel_ml::train::Position { epoch: 1, batch: 0 })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(Trainer::<Cpu>::resume(&bytes, Default::default()).is_ok());
    // A bit in the middle of the dense weights: it would still decode as a float.
    let mut flipped = bytes.clone();
    let middle = bytes.len() / 2;
    flipped[middle] ^= 0x01;
    assert!(matches!(
        Trainer::<Cpu>::resume(&flipped, Default::default()),
        Err(ArtifactError::ShaMismatch { .. })
    ));
}

mod damaged {
    //! Random damage (byte flips, truncation, garbage) to an artifact, a checkpoint and an embedding table:
    //! each decoder returns an error or a value, never panics.

    use std::sync::OnceLock;

    use burn::backend::Flex;
    use flywheel_ml::artifact;
    use flywheel_ml::embedding::EmbeddingTable;
    use flywheel_ml::train::{Position, Trainer};
    use proptest::prelude::*;

    struct Encoded {
        artifact: Vec<u8>,
        checkpoint: Vec<u8>,
        table: Vec<u8>,
    }

    fn encoded() -> &'static Encoded {
        static ENCODED: OnceLock<Encoded> = OnceLock::new();
        ENCODED.get_or_init(|| {
            let (trainer, card, _) = super::trained();
            let artifact = artifact::encode(&card, &trainer.model, &trainer.tables, false)
                .unwrap_or_else(|e| panic!("{e}"));
            let checkpoint = trainer
                .checkpoint(&card, Position { epoch: 1, batch: 0 })
                .unwrap_or_else(|e| panic!("{e}"));
            let mut table = Vec::new();
            trainer.tables.first_order.write_to(&mut table, true);
            Encoded {
                artifact,
                checkpoint,
                table,
            }
        })
    }

    fn damage(
        bytes: &[u8],
        flips: &[(prop::sample::Index, u8)],
        cut: Option<prop::sample::Index>,
    ) -> Vec<u8> {
        let mut damaged = bytes.to_vec();
        for (at, mask) in flips {
            let at = at.index(damaged.len());
            damaged[at] ^= mask;
        }
        if let Some(cut) = cut {
            damaged.truncate(cut.index(damaged.len()));
        }
        damaged
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn damaged_artifacts_checkpoints_and_tables_never_panic(
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
            cut in prop::option::of(any::<prop::sample::Index>()),
        ) {
            let encoded = encoded();
            let _ = artifact::decode::<Flex>(&damage(&encoded.artifact, &flips, cut), &Default::default());
            let _ = artifact::card(&damage(&encoded.artifact, &flips, cut));
            let _ = Trainer::<super::Cpu>::resume(&damage(&encoded.checkpoint, &flips, cut), Default::default());
            let table = damage(&encoded.table, &flips, cut);
            let _ = EmbeddingTable::read_from(&mut table.as_slice());
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let mut framed = b"FWM1".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = artifact::decode::<Flex>(&bytes, &Default::default());
            let _ = artifact::decode::<Flex>(&framed, &Default::default());
            let _ = Trainer::<super::Cpu>::resume(&bytes, Default::default());
            let _ = EmbeddingTable::read_from(&mut bytes.as_slice());
        }
    }
}
