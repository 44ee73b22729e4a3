//! The ML core shared by trainer and serving, so the two can never disagree: feature transforms, models,
//! the artifact format, metrics and the synthetic CTR generator. No Kubernetes in here. Empty until the
//! trainer work lands.
