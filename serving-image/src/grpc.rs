//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`) and the feedback service. Tensors
//! arrive either in typed `contents` or as raw little-endian bytes (`raw_input_contents`, Triton's default);
//! the answer uses the same form the request did.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::kafka::ClickEvent;
use crate::request::{Column, Datatype, InferRequest, Input, RequestError, datatype_of};
use crate::server::{InferError, LabelError, LabelOutcome, Server};

pub mod inference {
    tonic::include_proto!("inference");
}

pub mod feedback {
    tonic::include_proto!("flywheel.serving.v1");
}

use inference::grpc_inference_service_server::GrpcInferenceService;
use inference::model_infer_request::InferInputTensor;
use inference::model_infer_response::InferOutputTensor;
use inference::model_metadata_response::TensorMetadata;
use inference::*;

pub struct InferenceService {
    pub server: Arc<Server>,
}

fn status_of(err: &InferError) -> Status {
    match err {
        InferError::Invalid(_) => Status::invalid_argument(err.to_string()),
        InferError::UnknownModel(_) => Status::not_found(err.to_string()),
        InferError::NotReady(_) | InferError::OnlineStore(_) => {
            Status::unavailable(err.to_string())
        }
        InferError::Internal | InferError::RequestId(_) => Status::internal(err.to_string()),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.server.slot.current().is_some(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self
            .server
            .model_for(&request.name, Some(&request.version))
            .is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "flywheel-serving".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self
            .server
            .model_for(&request.name, Some(&request.version))
            .map_err(|err| status_of(&err))?;
        let inputs = crate::request::input_features(&model.card.schema)
            .map(|(name, value_type)| TensorMetadata {
                name: name.to_owned(),
                datatype: datatype_of(value_type).to_owned(),
                shape: vec![-1],
            })
            .collect();
        Ok(Response::new(ModelMetadataResponse {
            name: self.server.model_name.clone(),
            versions: vec![model.version().to_owned()],
            platform: "flywheel".into(),
            inputs,
            outputs: vec![TensorMetadata {
                name: "score".into(),
                datatype: "FP64".into(),
                shape: vec![-1],
            }],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let raw = !request.raw_input_contents.is_empty();
        let server = &self.server;
        let result = async {
            let model = server.model_for(&request.model_name, Some(&request.model_version))?;
            let decoded = decode(request)?;
            server.infer(model, decoded).await
        }
        .await;
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(scored) => {
                server
                    .metrics
                    .request(&scored.version, "grpc", "OK", seconds);
                let mut output = InferOutputTensor {
                    name: "score".into(),
                    datatype: "FP64".into(),
                    shape: vec![i64::try_from(scored.scores.len()).unwrap_or(i64::MAX)],
                    ..InferOutputTensor::default()
                };
                let mut raw_output_contents = Vec::new();
                if raw {
                    raw_output_contents
                        .push(scored.scores.iter().flat_map(|s| s.to_le_bytes()).collect());
                } else {
                    output.contents = Some(InferTensorContents {
                        fp64_contents: scored.scores,
                        ..InferTensorContents::default()
                    });
                }
                Ok(Response::new(ModelInferResponse {
                    model_name: server.model_name.clone(),
                    model_version: scored.version,
                    id: scored.id,
                    outputs: vec![output],
                    raw_output_contents,
                    ..ModelInferResponse::default()
                }))
            }
            Err(err) => {
                let version = server
                    .slot
                    .current()
                    .map(|m| m.version().to_owned())
                    .unwrap_or_default();
                server
                    .metrics
                    .request(&version, "grpc", err.code(), seconds);
                Err(status_of(&err))
            }
        }
    }
}

/// Decodes the tensors of a gRPC inference request.
pub fn decode(request: ModelInferRequest) -> Result<InferRequest, RequestError> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(RequestError::Body(format!(
            "{} raw_input_contents for {} inputs",
            raw.len(),
            request.inputs.len()
        )));
    }
    let inputs = request
        .inputs
        .into_iter()
        .enumerate()
        .map(|(index, tensor)| {
            let column = match raw.get(index) {
                Some(bytes) => raw_column(&tensor, bytes)?,
                None => typed_column(&tensor)?,
            };
            Ok(Input {
                name: tensor.name,
                shape: tensor.shape,
                column,
            })
        })
        .collect::<Result<_, RequestError>>()?;
    Ok(InferRequest {
        id: Some(request.id).filter(|id| !id.is_empty()),
        inputs,
    })
}

fn datatype(tensor: &InferInputTensor) -> Result<Datatype, RequestError> {
    Datatype::parse(&tensor.datatype).ok_or_else(|| RequestError::Datatype {
        input: tensor.name.clone(),
        expected: "a known datatype",
        got: tensor.datatype.clone(),
    })
}

fn typed_column(tensor: &InferInputTensor) -> Result<Column, RequestError> {
    let kind = datatype(tensor)?;
    let contents = tensor.contents.clone().unwrap_or_default();
    let utf8_error = |index: usize| RequestError::BadValue {
        input: tensor.name.clone(),
        message: format!("element {index} is not UTF-8"),
    };
    Ok(match (kind, tensor.datatype.as_str()) {
        (Datatype::Bool, _) => Column::Bool(contents.bool_contents),
        (Datatype::Int, "INT64") => Column::Int(contents.int64_contents),
        (Datatype::Int, "UINT64") => Column::Int(
            contents
                .uint64_contents
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    i64::try_from(v).map_err(|_| RequestError::BadValue {
                        input: tensor.name.clone(),
                        message: format!("element {i} ({v}) does not fit a 64-bit signed integer"),
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        (Datatype::Int, "UINT8" | "UINT16" | "UINT32") => Column::Int(
            contents
                .uint_contents
                .iter()
                .map(|&v| i64::from(v))
                .collect(),
        ),
        (Datatype::Int, _) => Column::Int(
            contents
                .int_contents
                .iter()
                .map(|&v| i64::from(v))
                .collect(),
        ),
        (Datatype::Float, "FP32") => Column::Float(
            contents
                .fp32_contents
                .iter()
                .map(|&v| f64::from(v))
                .collect(),
        ),
        (Datatype::Float, _) => Column::Float(contents.fp64_contents),
        (Datatype::Bytes, _) => Column::Str(
            contents
                .bytes_contents
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| String::from_utf8(bytes).map_err(|_| utf8_error(i)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn raw_column(tensor: &InferInputTensor, bytes: &[u8]) -> Result<Column, RequestError> {
    let kind = datatype(tensor)?;
    let bad = |message: String| RequestError::BadValue {
        input: tensor.name.clone(),
        message,
    };
    let width = match tensor.datatype.as_str() {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        _ => 0,
    };
    if width > 0 && !bytes.len().is_multiple_of(width) {
        return Err(bad(format!(
            "{} raw bytes are not a whole number of {} values",
            bytes.len(),
            tensor.datatype
        )));
    }
    let chunks = || bytes.chunks_exact(width.max(1));
    Ok(match (kind, tensor.datatype.as_str()) {
        (Datatype::Bool, _) => Column::Bool(bytes.iter().map(|&b| b != 0).collect()),
        (Datatype::Int, "INT8") => Column::Int(bytes.iter().map(|&b| i64::from(b as i8)).collect()),
        (Datatype::Int, "UINT8") => Column::Int(bytes.iter().map(|&b| i64::from(b)).collect()),
        (Datatype::Int, "INT16") => Column::Int(
            chunks()
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        (Datatype::Int, "UINT16") => Column::Int(
            chunks()
                .map(|c| i64::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        (Datatype::Int, "INT32") => Column::Int(
            chunks()
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        (Datatype::Int, "UINT32") => Column::Int(
            chunks()
                .map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        (Datatype::Int, "UINT64") => Column::Int(
            chunks()
                .enumerate()
                .map(|(i, c)| {
                    let v = u64::from_le_bytes(eight(c));
                    i64::try_from(v).map_err(|_| {
                        bad(format!(
                            "element {i} ({v}) does not fit a 64-bit signed integer"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        (Datatype::Int, _) => Column::Int(chunks().map(|c| i64::from_le_bytes(eight(c))).collect()),
        (Datatype::Float, "FP32") => Column::Float(
            chunks()
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        (Datatype::Float, _) => {
            Column::Float(chunks().map(|c| f64::from_le_bytes(eight(c))).collect())
        }
        (Datatype::Bytes, _) => Column::Str(length_prefixed(bytes).map_err(bad)?),
    })
}

fn eight(chunk: &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    out.copy_from_slice(&chunk[..8]);
    out
}

/// BYTES in raw form: each element is a little-endian u32 length and that many bytes.
fn length_prefixed(mut bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 4 {
            return Err(format!("element {} has a truncated length", out.len()));
        }
        let (len, rest) = bytes.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if rest.len() < len {
            return Err(format!(
                "element {} claims {len} bytes, {} remain",
                out.len(),
                rest.len()
            ));
        }
        let (value, rest) = rest.split_at(len);
        out.push(
            String::from_utf8(value.to_vec())
                .map_err(|_| format!("element {} is not UTF-8", out.len()))?,
        );
        bytes = rest;
    }
    Ok(out)
}

pub struct FeedbackService {
    pub server: Arc<Server>,
}

#[tonic::async_trait]
impl feedback::feedback_server::Feedback for FeedbackService {
    async fn label(
        &self,
        request: Request<feedback::LabelRequest>,
    ) -> Result<Response<feedback::LabelResponse>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        if !self.server.may_label(authorization) {
            self.server.metrics.feedback("grpc", "unauthenticated", 1);
            return Err(Status::unauthenticated(
                "feedback needs `authorization: Bearer <feedback token>` metadata",
            ));
        }
        let labels = request
            .into_inner()
            .labels
            .into_iter()
            .map(|label| ClickEvent {
                request_id: label.request_id,
                clicked: label.clicked,
            })
            .collect();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        match self.server.take_labels("grpc", labels).await {
            Ok(LabelOutcome::Joined { matched, unmatched }) => {
                Ok(Response::new(feedback::LabelResponse {
                    matched: count(matched),
                    unmatched: count(unmatched),
                    forwarded: 0,
                }))
            }
            Ok(LabelOutcome::Forwarded(forwarded)) => Ok(Response::new(feedback::LabelResponse {
                matched: 0,
                unmatched: 0,
                forwarded: count(forwarded),
            })),
            Err(err @ LabelError::RequestIdTooLong { .. }) => {
                Err(Status::invalid_argument(err.to_string()))
            }
            Err(err @ LabelError::Forward(_)) => Err(Status::unavailable(err.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tensor(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..InferInputTensor::default()
        }
    }

    #[test]
    fn raw_and_typed_contents_decode_alike() {
        let mut typed = tensor("x", "INT64", vec![2]);
        typed.contents = Some(InferTensorContents {
            int64_contents: vec![7, -1],
            ..InferTensorContents::default()
        });
        let typed = decode(ModelInferRequest {
            inputs: vec![typed],
            ..ModelInferRequest::default()
        });
        let raw = decode(ModelInferRequest {
            inputs: vec![tensor("x", "INT64", vec![2])],
            raw_input_contents: vec![[7i64.to_le_bytes(), (-1i64).to_le_bytes()].concat()],
            ..ModelInferRequest::default()
        });
        assert_eq!(typed, raw);
        let strings = decode(ModelInferRequest {
            inputs: vec![tensor("s", "BYTES", vec![2])],
            raw_input_contents: vec![
                [&2u32.to_le_bytes()[..], b"ab", &0u32.to_le_bytes()].concat(),
            ],
            ..ModelInferRequest::default()
        });
        assert!(
            matches!(strings, Ok(r) if r.inputs[0].column == Column::Str(vec!["ab".into(), String::new()]))
        );
    }

    #[test]
    fn truncated_raw_bytes_name_the_input() {
        let result = decode(ModelInferRequest {
            inputs: vec![tensor("price", "FP64", vec![1])],
            raw_input_contents: vec![vec![0; 7]],
            ..ModelInferRequest::default()
        });
        assert!(
            matches!(result, Err(RequestError::BadValue { ref input, .. }) if input == "price"),
            "{result:?}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_protobuf_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(request) = <ModelInferRequest as prost::Message>::decode(body.as_slice()) {
                let schema = flywheel_ml::synthetic::feature_schema(100);
                if let Ok(request) = decode(request) {
                    let _ = crate::request::encode(&schema, &request, 64);
                }
            }
        }

        #[test]
        fn arbitrary_raw_tensors_never_panic(
            datatype in prop::sample::select(vec!["BOOL", "INT8", "UINT16", "INT32", "UINT64", "INT64", "FP32", "FP64", "BYTES", "X"]),
            raw in proptest::collection::vec(any::<u8>(), 0..64),
            rows in -2i64..5,
        ) {
            let _ = decode(ModelInferRequest {
                inputs: vec![tensor("user_id", datatype, vec![rows])],
                raw_input_contents: vec![raw],
                ..ModelInferRequest::default()
            });
        }
    }
}
