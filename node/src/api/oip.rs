//! Open Inference Protocol v2 JSON shapes, and their conversion to and from the tensors
//! replicas take. Pure: no HTTP here.

pub use super::infer_json::Request;
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
    /// Row-major elements, flat or nested as the shape, flattened as they are read.
    pub data: Elements,
}

/// One element of a request's data, as JSON gave it.
#[derive(Clone, Debug, PartialEq)]
pub enum Element {
    Float(f64),
    Int(i64),
    Unsigned(u64),
    Text(String),
    /// Anything else (`true`, `null`, an object), named for the error message.
    Other(&'static str),
}

/// The leaves of a request input's (possibly nested) data array in row-major order.
///
/// Read straight from the JSON without building a `serde_json::Value` tree: decoding the
/// numbers of a request was the largest cost of serving a small model (a `Value` per
/// element, and an allocation per nested array).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Elements(pub Vec<Element>);

impl<'de> Deserialize<'de> for Elements {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Elements, D::Error> {
        let mut elements = Vec::new();
        deserializer.deserialize_any(Flatten(&mut elements))?;
        Ok(Elements(elements))
    }
}

/// Appends every leaf it visits to the vector, descending into arrays.
struct Flatten<'a>(&'a mut Vec<Element>);

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an array of numbers or strings, flat or nested")
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        self.0.push(Element::Float(value));
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        self.0.push(Element::Int(value));
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.0.push(Element::Unsigned(value));
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        self.0.push(Element::Text(value.to_string()));
        Ok(())
    }

    fn visit_string<E>(self, value: String) -> Result<(), E> {
        self.0.push(Element::Text(value));
        Ok(())
    }

    fn visit_bool<E>(self, value: bool) -> Result<(), E> {
        self.0
            .push(Element::Other(if value { "true" } else { "false" }));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push(Element::Other("null"));
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.0.push(Element::Other("null"));
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        self.0.push(Element::Other("an object"));
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl Serialize for Elements {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for element in &self.0 {
            match element {
                Element::Float(value) => seq.serialize_element(value)?,
                Element::Int(value) => seq.serialize_element(value)?,
                Element::Unsigned(value) => seq.serialize_element(value)?,
                Element::Text(value) => seq.serialize_element(value)?,
                Element::Other(_) => seq.serialize_element(&())?,
            }
        }
        seq.end()
    }
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Element::Float(value) => write!(f, "{value}"),
            Element::Int(value) => write!(f, "{value}"),
            Element::Unsigned(value) => write!(f, "{value}"),
            Element::Text(value) => write!(f, "{value:?}"),
            Element::Other(what) => f.write_str(what),
        }
    }
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
    let name = &input.name;
    let bad_element = |index: usize, element: &Element, expected: &str| {
        format!("input {name:?}: element {index} is {element}, expected {expected}")
    };
    let elements = input.data.0;
    let data = match datatype {
        DataType::Fp32 => {
            let mut values = Vec::with_capacity(elements.len());
            for (index, element) in elements.iter().enumerate() {
                values.push(match *element {
                    Element::Float(value) => value as f32,
                    Element::Int(value) => value as f32,
                    Element::Unsigned(value) => value as f32,
                    _ => return Err(bad_element(index, element, "a number")),
                });
            }
            TensorData::Fp32(values)
        }
        DataType::Int64 => {
            let mut values = Vec::with_capacity(elements.len());
            for (index, element) in elements.iter().enumerate() {
                values.push(match *element {
                    Element::Int(value) => value,
                    Element::Unsigned(value) => i64::try_from(value)
                        .map_err(|_| bad_element(index, element, "an integer"))?,
                    _ => return Err(bad_element(index, element, "an integer")),
                });
            }
            TensorData::Int64(values)
        }
        DataType::Bytes => {
            let mut values = Vec::with_capacity(elements.len());
            for (index, element) in elements.into_iter().enumerate() {
                match element {
                    Element::Text(value) => values.push(value),
                    other => return Err(bad_element(index, &other, "a string")),
                }
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

/// An infer request read into tensors: by the fast reader when it has the common shape
/// ([`super::infer_json`]), else through serde, which words every error.
pub fn read_request(body: &[u8]) -> Result<Request, String> {
    match super::infer_json::read(body) {
        Some(request) => Ok(request),
        None => read_with_serde(body),
    }
}

/// An infer request read through serde: every shape the protocol allows, every error
/// worded.
pub(super) fn read_with_serde(body: &[u8]) -> Result<Request, String> {
    let request: InferRequest = serde_json::from_slice(body)
        .map_err(|error| format!("malformed infer request: {error}"))?;
    let inputs = request
        .inputs
        .into_iter()
        .map(to_tensor)
        .collect::<Result<_, _>>()?;
    Ok(Request {
        id: request.id,
        inputs,
        outputs: request
            .outputs
            .into_iter()
            .map(|output| output.name)
            .collect(),
    })
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
            data: serde_json::from_value(data).unwrap(),
        }
    }

    #[test]
    fn elements_flatten_nested_arrays_and_name_what_is_not_data() {
        let elements: Elements =
            serde_json::from_str(r#"[[1, -2], [3.5, "x"], [true, null, {"a": [1]}]]"#).unwrap();
        assert_eq!(
            elements.0,
            vec![
                Element::Unsigned(1),
                Element::Int(-2),
                Element::Float(3.5),
                Element::Text("x".into()),
                Element::Other("true"),
                Element::Other("null"),
                Element::Other("an object"),
            ]
        );
        let refused = to_tensor(input("FP32", vec![2], json!([1, {"a": 1}]))).unwrap_err();
        assert!(refused.contains("element 1 is an object"), "{refused}");
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
