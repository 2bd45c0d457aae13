//! Open Inference Protocol v2 JSON shapes, and their conversion to and from the tensors
//! replicas take. Pure: no HTTP here.

use super::infer_json::Nesting;
pub use super::infer_json::Request;
use serde::{Deserialize, Serialize};
use shoal_actors::tensor::{NamedTensor, TensorData};
use shoal_scheduler::{DataType, TensorSpec};

/// The header that marks a body (request or answer) as OIP's binary tensor data extension:
/// the first this-many bytes are the JSON, the rest the tensors' bytes.
pub const BINARY_HEADER_LENGTH: &str = "inference-header-content-length";

/// The content type of a body with binary tensor data.
pub const BINARY_CONTENT_TYPE: &str = "application/octet-stream";

/// `POST …/infer` body.
#[derive(Debug, Deserialize, Serialize)]
pub struct InferRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub inputs: Vec<RequestInput>,
    /// Outputs to return; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<RequestedOutput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<RequestParameters>,
}

/// Request-wide parameters Shoal reads; others are ignored, as the protocol allows.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct RequestParameters {
    /// Every output as binary tensor data (the binary extension).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary_data_output: bool,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// Row-major elements, flat or nested as the shape, flattened as they are read. Absent
    /// when the elements come as binary tensor data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Elements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<TensorParameters>,
}

/// A tensor's parameters Shoal reads.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct TensorParameters {
    /// This tensor's bytes in the binary part of the body (the binary extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_data_size: Option<usize>,
    /// For a requested output: answer it as binary tensor data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary_data: bool,
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

/// The leaves of a request input's (possibly nested) data array in row-major order, and
/// how the arrays were nested (checked against the input's shape in [`to_tensor`]).
///
/// Read straight from the JSON without building a `serde_json::Value` tree: decoding the
/// numbers of a request was the largest cost of serving a small model (a `Value` per
/// element, and an allocation per nested array).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Elements {
    pub values: Vec<Element>,
    pub nesting: Nesting,
}

impl<'de> Deserialize<'de> for Elements {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Elements, D::Error> {
        let mut elements = Elements::default();
        deserializer.deserialize_any(Flatten {
            values: &mut elements.values,
            nesting: &mut elements.nesting,
            depth: 0,
        })?;
        Ok(elements)
    }
}

/// Appends every leaf it visits to the vector, descending into arrays, and tells
/// `nesting` each array's length as it ends. Visiting gives whether the value was an
/// array.
struct Flatten<'a> {
    values: &'a mut Vec<Element>,
    nesting: &'a mut Nesting,
    /// How deep in the data's arrays the value visited is (0: the data itself).
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = bool;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an array of numbers or strings, flat or nested")
    }

    fn visit_f64<E>(self, value: f64) -> Result<bool, E> {
        self.values.push(Element::Float(value));
        Ok(false)
    }

    fn visit_i64<E>(self, value: i64) -> Result<bool, E> {
        self.values.push(Element::Int(value));
        Ok(false)
    }

    fn visit_u64<E>(self, value: u64) -> Result<bool, E> {
        self.values.push(Element::Unsigned(value));
        Ok(false)
    }

    fn visit_str<E>(self, value: &str) -> Result<bool, E> {
        self.values.push(Element::Text(value.to_string()));
        Ok(false)
    }

    fn visit_string<E>(self, value: String) -> Result<bool, E> {
        self.values.push(Element::Text(value));
        Ok(false)
    }

    fn visit_bool<E>(self, value: bool) -> Result<bool, E> {
        self.values
            .push(Element::Other(if value { "true" } else { "false" }));
        Ok(false)
    }

    fn visit_unit<E>(self) -> Result<bool, E> {
        self.values.push(Element::Other("null"));
        Ok(false)
    }

    fn visit_none<E>(self) -> Result<bool, E> {
        self.values.push(Element::Other("null"));
        Ok(false)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        self.values.push(Element::Other("an object"));
        Ok(false)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let (mut items, mut arrays) = (0, 0);
        while let Some(was_array) = seq.next_element_seed(Flatten {
            values: &mut *self.values,
            nesting: &mut *self.nesting,
            depth: self.depth + 1,
        })? {
            items += 1;
            arrays += usize::from(was_array);
        }
        self.nesting.close(self.depth, items, arrays);
        Ok(true)
    }
}

impl Serialize for Elements {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.values.len()))?;
        for element in &self.values {
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<TensorParameters>,
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
    /// Absent when the output is answered as binary tensor data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ResponseData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<TensorParameters>,
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

/// An input's shape, refused when a dimension is negative.
fn dimensions(input: &RequestInput) -> Result<Vec<usize>, String> {
    input
        .shape
        .iter()
        .map(|&dimension| usize::try_from(dimension))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!(
                "input {:?}: shape {:?} has a negative dimension",
                input.name, input.shape
            )
        })
}

/// Converts one request input into a tensor. Shape and element count are checked against
/// the model's signature later; here only the JSON itself.
pub fn to_tensor(input: RequestInput) -> Result<NamedTensor, String> {
    let datatype = parse_datatype(&input.datatype)
        .map_err(|message| format!("input {:?}: {message}", input.name))?;
    let shape = dimensions(&input)?;
    let name = &input.name;
    let bad_element = |index: usize, element: &Element, expected: &str| {
        format!("input {name:?}: element {index} is {element}, expected {expected}")
    };
    let Some(Elements {
        values: elements,
        nesting,
    }) = input.data
    else {
        return Err(format!(
            "input {name:?} has no data: give `data`, or `binary_data_size` with the \
             {BINARY_HEADER_LENGTH} header"
        ));
    };
    if !nesting.fits(&shape) {
        return Err(format!("input {name:?}: data {}", nesting.mismatch(&shape)));
    }
    let data = match datatype {
        DataType::Fp32 => {
            let mut values = Vec::with_capacity(elements.len());
            for (index, element) in elements.iter().enumerate() {
                values.push(match *element {
                    Element::Float(value) => {
                        // serde_json reads only finite numbers; one past FP32's range would
                        // reach the model as an infinity.
                        let narrowed = value as f32;
                        if narrowed.is_infinite() {
                            return Err(format!(
                                "input {name:?}: element {index} is {value:e}, outside the \
                                 range of FP32 (±{:e})",
                                f32::MAX
                            ));
                        }
                        narrowed
                    }
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

/// An infer request read into tensors. With `header_bytes` (the binary extension's header)
/// the body's first `header_bytes` are the JSON and the rest the inputs' bytes; without, it
/// is all JSON, read by the fast reader when it has the common shape
/// ([`super::infer_json`]), else through serde, which words every error.
pub fn read_request(body: &[u8], header_bytes: Option<usize>) -> Result<Request, String> {
    let request = match header_bytes {
        Some(header_bytes) => read_binary_request(body, header_bytes)?,
        None => match super::infer_json::read(body) {
            Some(request) => request,
            None => read_with_serde(body)?,
        },
    };
    check_names(&request)?;
    Ok(request)
}

/// Refuses a request that gives an input twice, or asks for an output twice: which of
/// the two would count is anybody's guess.
fn check_names(request: &Request) -> Result<(), String> {
    if let Some(name) = repeated(&request.inputs, |input| &input.name) {
        return Err(format!(
            "input {name:?} is given twice; give each input once"
        ));
    }
    if let Some(name) = repeated(&request.outputs, |wanted| &wanted.name) {
        return Err(format!(
            "output {name:?} is asked for twice; name each output once"
        ));
    }
    Ok(())
}

/// The first name in `items` that an earlier item has too.
fn repeated<'a, T>(items: &'a [T], name: impl Fn(&'a T) -> &'a str) -> Option<&'a str> {
    /// Up to this many names each is compared with those before it, which costs nothing
    /// for the one or two tensors a request names; beyond, a set, so that a body of
    /// thousands of inputs costs thousands of steps, not millions.
    const PAIRWISE_MAX: usize = 16;
    if items.len() <= PAIRWISE_MAX {
        return items.iter().enumerate().find_map(|(index, item)| {
            let this = name(item);
            items[..index]
                .iter()
                .any(|earlier| name(earlier) == this)
                .then_some(this)
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items.iter().map(name).find(|this| !seen.insert(*this))
}

/// An infer request read through serde: every shape the protocol allows, every error
/// worded.
pub(super) fn read_with_serde(body: &[u8]) -> Result<Request, String> {
    let request: InferRequest = serde_json::from_slice(body)
        .map_err(|error| format!("malformed infer request: {error}"))?;
    let (inputs, rest) = split_request(request);
    let inputs = inputs
        .into_iter()
        .map(to_tensor)
        .collect::<Result<_, _>>()?;
    Ok(Request { inputs, ..rest })
}

/// A request's inputs, and the rest of it as a [`Request`] with no inputs yet.
fn split_request(request: InferRequest) -> (Vec<RequestInput>, Request) {
    let rest = Request {
        id: request.id,
        inputs: Vec::new(),
        outputs: request
            .outputs
            .into_iter()
            .map(|output| super::infer_json::Wanted {
                binary: output.parameters.is_some_and(|p| p.binary_data),
                name: output.name,
            })
            .collect(),
        binary_output: request.parameters.is_some_and(|p| p.binary_data_output),
    };
    (request.inputs, rest)
}

/// A request in the binary tensor data extension: JSON, then each input with a
/// `binary_data_size` parameter takes that many bytes, in the order the inputs are listed.
/// Elements are little-endian; a BYTES element is a 4-byte little-endian length, then the
/// bytes.
fn read_binary_request(body: &[u8], header_bytes: usize) -> Result<Request, String> {
    let Some((header, mut binary)) = body.split_at_checked(header_bytes) else {
        return Err(format!(
            "{BINARY_HEADER_LENGTH} is {header_bytes} but the body has {} bytes",
            body.len()
        ));
    };
    let request: InferRequest = serde_json::from_slice(header)
        .map_err(|error| format!("malformed infer request header: {error}"))?;
    let (request_inputs, rest) = split_request(request);
    let mut inputs = Vec::with_capacity(request_inputs.len());
    for input in request_inputs {
        let size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
        let Some(size) = size else {
            inputs.push(to_tensor(input)?);
            continue;
        };
        if input.data.is_some() {
            return Err(format!(
                "input {:?} has both `data` and `binary_data_size`",
                input.name
            ));
        }
        let Some((bytes, remaining)) = binary.split_at_checked(size) else {
            return Err(format!(
                "input {:?}: binary_data_size is {size} but {} bytes of binary data are left",
                input.name,
                binary.len()
            ));
        };
        binary = remaining;
        inputs.push(binary_tensor(input, bytes)?);
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary data follow the last input's",
            binary.len()
        ));
    }
    Ok(Request { inputs, ..rest })
}

/// One input's elements from its binary tensor data.
fn binary_tensor(input: RequestInput, bytes: &[u8]) -> Result<NamedTensor, String> {
    let name = &input.name;
    let datatype =
        parse_datatype(&input.datatype).map_err(|message| format!("input {name:?}: {message}"))?;
    let shape = dimensions(&input)?;
    let width = match datatype {
        DataType::Fp32 => 4,
        DataType::Int64 => 8,
        DataType::Bytes => 1,
    };
    if !bytes.len().is_multiple_of(width) {
        return Err(format!(
            "input {name:?}: {} bytes of {} data is not a whole number of elements",
            bytes.len(),
            datatype.as_str()
        ));
    }
    let data = match datatype {
        DataType::Fp32 => {
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // JSON cannot carry them either; a NaN reaching the model came back as `null`
            // in every JSON answer it touched.
            if let Some(index) = values.iter().position(|value| !value.is_finite()) {
                return Err(format!(
                    "input {name:?}: element {index} is {}; FP32 data must be finite",
                    values[index]
                ));
            }
            TensorData::Fp32(values)
        }
        DataType::Int64 => TensorData::Int64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        DataType::Bytes => TensorData::Bytes(binary_strings(name, bytes)?),
    };
    Ok(NamedTensor {
        name: input.name,
        shape,
        data,
    })
}

/// BYTES elements: each a 4-byte little-endian length, then that many bytes of UTF-8.
fn binary_strings(name: &str, mut bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut strings = Vec::new();
    while !bytes.is_empty() {
        let Some((length, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(format!(
                "input {name:?}: element {} has a cut-off length",
                strings.len()
            ));
        };
        let length = u32::from_le_bytes(*length) as usize;
        let Some((text, rest)) = rest.split_at_checked(length) else {
            return Err(format!(
                "input {name:?}: element {} says {length} bytes but {} are left",
                strings.len(),
                rest.len()
            ));
        };
        let text = std::str::from_utf8(text)
            .map_err(|_| format!("input {name:?}: element {} is not UTF-8", strings.len()))?;
        strings.push(text.to_string());
        bytes = rest;
    }
    Ok(strings)
}

/// Appends a tensor's elements as binary tensor data.
fn append_binary(data: &ResponseData, out: &mut Vec<u8>) {
    match data {
        ResponseData::Fp32(values) => {
            out.extend(values.iter().flat_map(|value| value.to_le_bytes()));
        }
        ResponseData::Int64(values) => {
            out.extend(values.iter().flat_map(|value| value.to_le_bytes()));
        }
        ResponseData::Bytes(values) => {
            for value in values {
                // A replica's strings are labels and generated text, far below 4 GiB.
                let length = u32::try_from(value.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&length.to_le_bytes());
                out.extend_from_slice(value.as_bytes());
            }
        }
    }
}

/// An answer's body, and the length of its JSON part when outputs for which `binary` holds
/// follow as binary tensor data (the value of [`BINARY_HEADER_LENGTH`]).
pub fn encode_response(
    mut response: InferResponse,
    binary: impl Fn(&str) -> bool,
) -> (Vec<u8>, Option<usize>) {
    let mut tensors = Vec::new();
    for output in &mut response.outputs {
        if !binary(&output.name) {
            continue;
        }
        if let Some(data) = output.data.take() {
            let start = tensors.len();
            append_binary(&data, &mut tensors);
            output.parameters = Some(TensorParameters {
                binary_data_size: Some(tensors.len() - start),
                binary_data: false,
            });
        }
    }
    // Serialising plain data to a vector does not fail.
    let mut body = serde_json::to_vec(&response).unwrap_or_default();
    if response.outputs.iter().all(|output| output.data.is_some()) {
        return (body, None);
    }
    let header_bytes = body.len();
    body.extend_from_slice(&tensors);
    (body, Some(header_bytes))
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
        data: Some(data),
        parameters: None,
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
            parameters: None,
        }
    }

    #[test]
    fn elements_flatten_nested_arrays_and_name_what_is_not_data() {
        let elements: Elements =
            serde_json::from_str(r#"[[1, -2], [3.5, "x"], [true, null, {"a": [1]}]]"#).unwrap();
        assert_eq!(
            elements.values,
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
    fn fp32_numbers_past_its_range_are_refused_naming_the_element() {
        for (shape, data, element) in [
            (vec![4], json!([1e39, 2, 3, 4]), "element 0 is 1e39"),
            (
                vec![2, 2],
                json!([[1, 2], [3, -1e300]]),
                "element 3 is -1e300",
            ),
        ] {
            let refused = to_tensor(input("FP32", shape, data)).unwrap_err();
            assert!(refused.contains("input \"x\""), "{refused}");
            assert!(refused.contains(element), "{refused}");
            assert!(refused.contains("range of FP32"), "{refused}");
        }
        // The largest FP32, and what rounds down to it or to zero, still fit.
        let edge = to_tensor(input(
            "FP32",
            vec![3],
            json!([3.4028235e38, -3.4028235e38, 1e-50]),
        ))
        .unwrap();
        assert_eq!(edge.data, TensorData::Fp32(vec![f32::MAX, f32::MIN, 0.0]));
    }

    /// Regression: an input given twice was accepted, and an output asked for twice was
    /// answered once.
    #[test]
    fn an_input_given_twice_or_an_output_asked_for_twice_is_refused_on_every_path() {
        let twice = r#"{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}"#;
        let other = r#"{"name": "y", "shape": [1], "datatype": "FP32", "data": [2]}"#;
        let inputs = [
            // The fast path's shape, and one only serde reads (`parameters`).
            format!(r#"{{"inputs": [{twice}, {other}, {twice}]}}"#),
            format!(r#"{{"inputs": [{twice}, {twice}], "parameters": {{}}}}"#),
        ];
        let outputs = [
            format!(r#"{{"inputs": [{twice}], "outputs": [{{"name": "p"}}, {{"name": "p"}}]}}"#),
            format!(
                r#"{{"inputs": [{twice}], "outputs": [{{"name": "p"}},
                    {{"name": "p", "parameters": {{"binary_data": true}}}}]}}"#
            ),
        ];
        for (bodies, expected) in [
            (&inputs, "input \"x\" is given twice"),
            (&outputs, "output \"p\" is asked for twice"),
        ] {
            for body in bodies {
                let refused = read_request(body.as_bytes(), None).unwrap_err();
                assert!(refused.contains(expected), "{body}: {refused}");
            }
        }
        // And in the binary tensor data extension.
        let four = 1.0f32.to_le_bytes();
        let binary_input = json!({"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}});
        let (body, header_bytes) = binary_body(
            &json!({"inputs": [binary_input, binary_input]}),
            &[&four, &four],
        );
        let refused = read_request(&body, Some(header_bytes)).unwrap_err();
        assert!(refused.contains("input \"x\" is given twice"), "{refused}");
        let (body, header_bytes) = binary_body(
            &json!({"inputs": [binary_input], "outputs": [{"name": "p"}, {"name": "p"}]}),
            &[&four],
        );
        let refused = read_request(&body, Some(header_bytes)).unwrap_err();
        assert!(
            refused.contains("output \"p\" is asked for twice"),
            "{refused}"
        );

        // Many inputs (past the pairwise comparison) are checked as well.
        let many: Vec<String> = (0..40)
            .map(|index| {
                format!(
                    r#"{{"name": "i{}", "shape": [1], "datatype": "FP32", "data": [1]}}"#,
                    index % 39
                )
            })
            .collect();
        let body = format!(r#"{{"inputs": [{}]}}"#, many.join(","));
        let refused = read_request(body.as_bytes(), None).unwrap_err();
        assert!(refused.contains("input \"i0\" is given twice"), "{refused}");
        let distinct = format!(r#"{{"inputs": [{}]}}"#, many[..39].join(","));
        assert!(read_request(distinct.as_bytes(), None).is_ok());
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

    /// A binary-extension body: the JSON header, then each tensor's bytes in order.
    fn binary_body(header: &serde_json::Value, tensors: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut body = header.to_string().into_bytes();
        let header_bytes = body.len();
        for tensor in tensors {
            body.extend_from_slice(tensor);
        }
        (body, header_bytes)
    }

    #[test]
    fn binary_tensor_data_reads_like_the_same_json() {
        let floats: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ints: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let strings = [&3u32.to_le_bytes()[..], b"abc", &0u32.to_le_bytes()[..]].concat();
        let (body, header_bytes) = binary_body(
            &json!({"id": "b", "inputs": [
                {"name": "x", "shape": [2, 2], "datatype": "FP32",
                 "parameters": {"binary_data_size": 16}},
                {"name": "n", "shape": [2], "datatype": "INT64", "data": [7, -1]},
                {"name": "i", "shape": [2], "datatype": "INT64",
                 "parameters": {"binary_data_size": 16}},
                {"name": "s", "shape": [2], "datatype": "BYTES",
                 "parameters": {"binary_data_size": 11}}],
             "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]}),
            &[&floats, &ints, &strings],
        );
        let request = read_request(&body, Some(header_bytes)).unwrap();
        assert_eq!(request.id.as_deref(), Some("b"));
        let data: Vec<_> = request.inputs.iter().map(|input| &input.data).collect();
        assert_eq!(
            data,
            [
                &TensorData::Fp32(vec![1.5, -2.0, 0.25, 8.0]),
                &TensorData::Int64(vec![7, -1]),
                &TensorData::Int64(vec![7, -1]),
                &TensorData::Bytes(vec!["abc".into(), String::new()]),
            ]
        );
        assert_eq!(request.inputs[0].shape, [2, 2]);
        assert!(request.binary("y") && !request.binary("z") && request.wants("z"));
        assert!(!request.wants("w"));
    }

    #[test]
    fn binary_tensor_data_that_does_not_add_up_is_refused_with_the_reason() {
        let header = |size: usize, extra: serde_json::Value| {
            let mut input = json!({"name": "x", "shape": [1], "datatype": "FP32",
                "parameters": {"binary_data_size": size}});
            if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
                input.extend(extra.clone());
            }
            json!({"inputs": [input]})
        };
        let four = 1.0f32.to_le_bytes();
        let cases = [
            (
                binary_body(&header(8, json!({})), &[&four]),
                "4 bytes of binary data are left",
            ),
            (
                binary_body(&header(4, json!({})), &[&four, &four]),
                "4 bytes of binary data follow",
            ),
            (
                binary_body(&header(3, json!({})), &[&four[..3]]),
                "not a whole number",
            ),
            (
                binary_body(&header(4, json!({"data": [1]})), &[&four]),
                "both `data`",
            ),
            (
                binary_body(
                    &json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}),
                    &[],
                ),
                "has no data",
            ),
            // Regression: a NaN was served, and answered as `null`.
            (
                binary_body(&header(4, json!({})), &[&f32::NAN.to_le_bytes()]),
                "element 0 is NaN; FP32 data must be finite",
            ),
            (
                binary_body(&header(4, json!({})), &[&f32::NEG_INFINITY.to_le_bytes()]),
                "element 0 is -inf",
            ),
        ];
        for ((body, header_bytes), expected) in cases {
            let refused = read_request(&body, Some(header_bytes)).unwrap_err();
            assert!(refused.contains(expected), "{refused} lacks {expected:?}");
        }
        let beyond = read_request(b"{}", Some(10)).unwrap_err();
        assert!(beyond.contains("the body has 2 bytes"), "{beyond}");
        let cut = binary_body(
            &json!({"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES",
                "parameters": {"binary_data_size": 6}}]}),
            &[&[9, 0, 0, 0, b'a', b'b']],
        );
        let refused = read_request(&cut.0, Some(cut.1)).unwrap_err();
        assert!(refused.contains("says 9 bytes but 2 are left"), "{refused}");
    }

    #[test]
    fn binary_outputs_follow_the_json_header_in_order() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![
                to_output(NamedTensor {
                    name: "p".into(),
                    shape: vec![2],
                    data: TensorData::Fp32(vec![0.5, 2.0]),
                }),
                to_output(NamedTensor {
                    name: "label".into(),
                    shape: vec![1],
                    data: TensorData::Bytes(vec!["ok".into()]),
                }),
            ],
        };
        let (body, header_bytes) = encode_response(response, |name| name == "p");
        let header_bytes = header_bytes.expect("a binary answer");
        let header: serde_json::Value = serde_json::from_slice(&body[..header_bytes]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(header["outputs"][0].get("data").is_none());
        assert_eq!(header["outputs"][1]["data"], json!(["ok"]));
        let floats: Vec<u8> = [0.5f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(&body[header_bytes..], &floats[..]);

        let plain = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: Vec::new(),
        };
        assert_eq!(encode_response(plain, |_| true).1, None);
    }
}
