//! ConfigMap volumes for the kubelet stand-in: a pod's `configMap` volumes are projected into local directories
//! (one file per key, or per `items` entry), the mount paths in its containers' command, args and env are replaced
//! by those directories, and the files follow the ConfigMap while the pod runs, each replaced atomically (a
//! rename), as the kubelet's atomic writer does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod};
use kube::Api;

/// How often a running pod's ConfigMaps are read again (the real kubelet takes up to a minute).
pub const REFRESH: Duration = Duration::from_secs(1);

/// One `configMap` volume of a pod and where it is projected.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigMapVolume {
    pub volume: String,
    pub config_map: String,
    /// `items`: key → relative path; None projects every key under its own name.
    pub items: Option<Vec<(String, String)>>,
    pub optional: bool,
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("configmap {0} not found")]
    Missing(String),
    #[error("reading configmap {name}: {source}")]
    Read { name: String, source: kube::Error },
    #[error("configmap {name}: key {key} is not in it")]
    MissingKey { name: String, key: String },
    #[error("configmap {name}: {path} is not a relative path inside the volume")]
    BadPath { name: String, path: String },
    #[error("projecting configmap {name} into {dir}: {source}")]
    Write {
        name: String,
        dir: String,
        source: std::io::Error,
    },
}

/// The pod's `configMap` volumes, projected under `work_dir/volumes/<volume>`.
pub fn config_map_volumes(pod: &Pod, work_dir: &Path) -> Vec<ConfigMapVolume> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten())
        .filter_map(|volume| {
            let source = volume.config_map.as_ref()?;
            Some(ConfigMapVolume {
                volume: volume.name.clone(),
                config_map: source.name.clone(),
                items: source.items.as_ref().map(|items| {
                    items
                        .iter()
                        .map(|item| (item.key.clone(), item.path.clone()))
                        .collect()
                }),
                optional: source.optional.unwrap_or(false),
                dir: work_dir.join("volumes").join(&volume.name),
            })
        })
        .collect()
}

/// The container's mount paths of those volumes and their local directories (`subPath` mounts are left out).
pub fn mounts(container: &Container, volumes: &[ConfigMapVolume]) -> Vec<(String, PathBuf)> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|mount| mount.sub_path.as_deref().unwrap_or_default().is_empty())
        .filter_map(|mount| {
            let volume = volumes.iter().find(|v| v.volume == mount.name)?;
            Some((
                mount.mount_path.trim_end_matches('/').to_owned(),
                volume.dir.clone(),
            ))
        })
        .collect()
}

/// `value` with a mount path (the path itself or anything under it) replaced by its local directory.
pub fn local_path(value: &str, mounts: &[(String, PathBuf)]) -> Option<String> {
    mounts.iter().find_map(|(mount_path, dir)| {
        let rest = value.strip_prefix(mount_path.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", dir.display()))
    })
}

/// The files a ConfigMap projects: relative path → content.
pub fn files_of(
    config_map: &ConfigMap,
    volume: &ConfigMapVolume,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (key, value) in config_map.data.iter().flatten() {
        all.insert(key.clone(), value.clone().into_bytes());
    }
    for (key, value) in config_map.binary_data.iter().flatten() {
        all.insert(key.clone(), value.0.clone());
    }
    let Some(items) = &volume.items else {
        return Ok(all);
    };
    items
        .iter()
        .map(|(key, path)| {
            if path.starts_with('/') || path.split('/').any(|part| part == "..") {
                return Err(VolumeError::BadPath {
                    name: volume.config_map.clone(),
                    path: path.clone(),
                });
            }
            let content = all.get(key).ok_or_else(|| VolumeError::MissingKey {
                name: volume.config_map.clone(),
                key: key.clone(),
            })?;
            Ok((path.clone(), content.clone()))
        })
        .collect()
}

/// Writes the volume's files where their content changed. An optional ConfigMap that is missing projects an
/// empty directory; a required one is an error (the container cannot start yet).
pub async fn project(api: &Api<ConfigMap>, volume: &ConfigMapVolume) -> Result<(), VolumeError> {
    let config_map = api
        .get_opt(&volume.config_map)
        .await
        .map_err(|source| VolumeError::Read {
            name: volume.config_map.clone(),
            source,
        })?;
    let files = match config_map {
        Some(config_map) => files_of(&config_map, volume)?,
        None if volume.optional => BTreeMap::new(),
        None => return Err(VolumeError::Missing(volume.config_map.clone())),
    };
    let write_error = |source| VolumeError::Write {
        name: volume.config_map.clone(),
        dir: volume.dir.display().to_string(),
        source,
    };
    for (path, content) in &files {
        let target = volume.dir.join(path);
        if std::fs::read(&target).is_ok_and(|current| &current == content) {
            continue;
        }
        let parent = target.parent().unwrap_or(&volume.dir);
        std::fs::create_dir_all(parent).map_err(write_error)?;
        let staging = parent.join(format!(".{}.new", std::process::id()));
        std::fs::write(&staging, content).map_err(write_error)?;
        std::fs::rename(&staging, &target).map_err(write_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn volume(items: Option<Vec<(&str, &str)>>) -> ConfigMapVolume {
        ConfigMapVolume {
            volume: "routes".to_owned(),
            config_map: "ctr-routes".to_owned(),
            items: items.map(|items| {
                items
                    .into_iter()
                    .map(|(k, p)| (k.to_owned(), p.to_owned()))
                    .collect()
            }),
            optional: false,
            dir: PathBuf::from("/work/pod/volumes/routes"),
        }
    }

    #[test]
    fn mount_paths_become_the_local_directory() {
        let mounts = vec![(
            "/etc/flywheel".to_owned(),
            PathBuf::from("/work/pod/volumes/routes"),
        )];
        assert_eq!(
            local_path("/etc/flywheel/routes.json", &mounts).as_deref(),
            Some("/work/pod/volumes/routes/routes.json")
        );
        assert_eq!(
            local_path("/etc/flywheel", &mounts).as_deref(),
            Some("/work/pod/volumes/routes")
        );
        assert_eq!(local_path("/etc/flywheel-other/x", &mounts), None);
        assert_eq!(local_path("route", &mounts), None);
    }

    #[test]
    fn volumes_and_mounts_come_from_the_pod_spec() -> Result<(), serde_json::Error> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "router"},
            "spec": {
                "containers": [{"name": "route", "volumeMounts": [
                    {"name": "routes", "mountPath": "/etc/flywheel/", "readOnly": true},
                    {"name": "routes", "mountPath": "/etc/one-file", "subPath": "routes.json"},
                ]}],
                "volumes": [
                    {"name": "routes", "configMap": {"name": "ctr-routes"}},
                    {"name": "data", "persistentVolumeClaim": {"claimName": "c"}},
                ],
            },
        }))?;
        let volumes = config_map_volumes(&pod, Path::new("/work/pod"));
        assert_eq!(volumes, vec![volume(None)]);
        let container = &pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()[0];
        assert_eq!(
            mounts(container, &volumes),
            vec![(
                "/etc/flywheel".to_owned(),
                PathBuf::from("/work/pod/volumes/routes")
            )]
        );
        Ok(())
    }

    #[test]
    fn items_select_and_rename_keys() -> Result<(), Box<dyn std::error::Error>> {
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "ctr-routes"},
            "data": {"routes.json": "{}", "other": "x"},
            "binaryData": {"blob": "AAE="},
        }))?;
        let all = files_of(&config_map, &volume(None))?;
        assert_eq!(all.len(), 3);
        assert_eq!(all["blob"], vec![0u8, 1]);
        let picked = files_of(
            &config_map,
            &volume(Some(vec![("routes.json", "conf/r.json")])),
        )?;
        assert_eq!(
            picked,
            BTreeMap::from([("conf/r.json".to_owned(), b"{}".to_vec())])
        );
        assert!(matches!(
            files_of(&config_map, &volume(Some(vec![("nope", "n")]))),
            Err(VolumeError::MissingKey { .. })
        ));
        assert!(matches!(
            files_of(&config_map, &volume(Some(vec![("other", "../x")]))),
            Err(VolumeError::BadPath { .. })
        ));
        Ok(())
    }
}
