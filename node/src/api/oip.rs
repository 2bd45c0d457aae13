//! Open Inference Protocol v2 JSON shapes, and their conversion to and from the tensors
//! replicas take. Pure: no HTTP here.

use serde::{Deserialize, Serialize};
use shoal_actors::tensor::{NamedTensor, TensorData};
use shoal_scheduler::{DataType, TensorSpec};

/// `POST …/infer` body.
#[derive(Debug, Deserialize, Serialize)]
pub struct InferRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub inputs: Vec<RequestInput>,
    /// Outputs to return; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<RequestedOutput>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// Row-major elements, flat or nested as the shape.
    pub data: serde_json::Value,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct RequestedOutput {
    pub name: String,
}

/// `POST …/infer` answer.
#[derive(Debug, Deserialize, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub shape: Vec<usize>,
    pub datatype: String,
    pub data: ResponseData,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum ResponseData {
    Int64(Vec<i64>),
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

/// A tensor's name, type and shape in metadata answers.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl From<&TensorSpec> for TensorMetadata {
    fn from(spec: &TensorSpec) -> TensorMetadata {
        TensorMetadata {
            name: spec.name.clone(),
            datatype: spec.datatype.as_str().into(),
            shape: spec.shape.clone(),
        }
    }
}

/// `GET /v2/models/{model}` answer.
#[derive(Debug, Deserialize, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

fn parse_datatype(name: &str) -> Result<DataType, String> {
    match name {
        "FP32" => Ok(DataType::Fp32),
        "INT64" => Ok(DataType::Int64),
        "BYTES" => Ok(DataType::Bytes),
        other => Err(format!(
            "datatype {other:?} is not supported; use FP32, INT64 or BYTES"
        )),
    }
}

/// Converts one request input into a tensor. Shape and element count are checked against
/// the model's signature later; here only the JSON itself.
pub fn to_tensor(input: RequestInput) -> Result<NamedTensor, String> {
    let datatype = parse_datatype(&input.datatype)
        .map_err(|message| format!("input {:?}: {message}", input.name))?;
    let mut shape = Vec::with_capacity(input.shape.len());
    for &dimension in &input.shape {
        let Ok(dimension) = usize::try_from(dimension) else {
            return Err(format!(
                "input {:?}: shape {:?} has a negative dimension",
                input.name, input.shape
            ));
        };
        shape.push(dimension);
    }
    let mut leaves = Vec::new();
    flatten(&input.data, &mut leaves);
    let bad_element = |index: usize, expected: &str| {
        format!(
            "input {:?}: element {index} is {}, expected {expected}",
            input.name, leaves[index]
        )
    };
    let data = match datatype {
        DataType::Fp32 => {
            let mut values = Vec::with_capacity(leaves.len());
            for (index, leaf) in leaves.iter().enumerate() {
                let value = leaf
                    .as_f64()
                    .ok_or_else(|| bad_element(index, "a number"))?;
                values.push(value as f32);
            }
            TensorData::Fp32(values)
        }
        DataType::Int64 => {
            let mut values = Vec::with_capacity(leaves.len());
            for (index, leaf) in leaves.iter().enumerate() {
                let value = leaf
                    .as_i64()
                    .ok_or_else(|| bad_element(index, "an integer"))?;
                values.push(value);
            }
            TensorData::Int64(values)
        }
        DataType::Bytes => {
            let mut values = Vec::with_capacity(leaves.len());
            for (index, leaf) in leaves.iter().enumerate() {
                let value = leaf
                    .as_str()
                    .ok_or_else(|| bad_element(index, "a string"))?;
                values.push(value.to_string());
            }
            TensorData::Bytes(values)
        }
    };
    Ok(NamedTensor {
        name: input.name,
        shape,
        data,
    })
}

/// Collects the leaves of nested arrays in row-major order.
fn flatten<'a>(value: &'a serde_json::Value, leaves: &mut Vec<&'a serde_json::Value>) {
    match value {
        serde_json::Value::Array(items) => {
            for item in items {
                flatten(item, leaves);
            }
        }
        leaf => leaves.push(leaf),
    }
}

/// Converts a replica's output tensor into the protocol's shape.
pub fn to_output(tensor: NamedTensor) -> ResponseOutput {
    let datatype = tensor.data.datatype().as_str().to_string();
    let data = match tensor.data {
        TensorData::Fp32(values) => ResponseData::Fp32(values),
        TensorData::Int64(values) => ResponseData::Int64(values),
        TensorData::Bytes(values) => ResponseData::Bytes(values),
    };
    ResponseOutput {
        name: tensor.name,
        shape: tensor.shape,
        datatype,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(datatype: &str, shape: Vec<i64>, data: serde_json::Value) -> RequestInput {
        RequestInput {
            name: "x".into(),
            shape,
            datatype: datatype.into(),
            data,
        }
    }

    #[test]
    fn nested_and_flat_data_give_the_same_tensor() {
        let nested = to_tensor(input("FP32", vec![2, 2], json!([[1, 2], [3, 4.5]]))).unwrap();
        let flat = to_tensor(input("FP32", vec![2, 2], json!([1, 2, 3, 4.5]))).unwrap();
        assert_eq!(nested, flat);
        assert_eq!(nested.data, TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.5]));
    }

    #[test]
    fn each_datatype_converts_its_own_elements() {
        let ints = to_tensor(input("INT64", vec![2], json!([1, -2]))).unwrap();
        assert_eq!(ints.data, TensorData::Int64(vec![1, -2]));
        let strings = to_tensor(input("BYTES", vec![1], json!(["a"]))).unwrap();
        assert_eq!(strings.data, TensorData::Bytes(vec!["a".into()]));
    }

    #[test]
    fn bad_json_tensors_are_refused_with_the_reason() {
        let unsupported = to_tensor(input("FP16", vec![1], json!([1]))).unwrap_err();
        assert!(unsupported.contains("FP16"), "{unsupported}");
        let negative = to_tensor(input("FP32", vec![-1, 4], json!([1]))).unwrap_err();
        assert!(negative.contains("negative"), "{negative}");
        let string = to_tensor(input("FP32", vec![2], json!([1, "two"]))).unwrap_err();
        assert!(string.contains("element 1"), "{string}");
        let fraction = to_tensor(input("INT64", vec![1], json!([1.5]))).unwrap_err();
        assert!(fraction.contains("an integer"), "{fraction}");
    }

    #[test]
    fn outputs_keep_their_datatype_name() {
        let output = to_output(NamedTensor {
            name: "label".into(),
            shape: vec![1],
            data: TensorData::Bytes(vec!["setosa".into()]),
        });
        assert_eq!(output.datatype, "BYTES");
        assert_eq!(
            serde_json::to_value(&output.data).unwrap(),
            json!(["setosa"])
        );
    }
}
