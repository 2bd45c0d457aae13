//! Tensors as they cross the replica boundary: named, shaped, typed flat data, and their
//! validation against a model version's signature.

use shoal_scheduler::{DataType, Signature, TensorSpec};

/// The elements of a tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Int64(Vec<i64>),
    Bytes(Vec<String>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::Fp32(values) => values.len(),
            TensorData::Int64(values) => values.len(),
            TensorData::Bytes(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    /// Elements `start..end`, as a new tensor data of the same type.
    fn slice(&self, start: usize, end: usize) -> TensorData {
        match self {
            TensorData::Fp32(values) => TensorData::Fp32(values[start..end].to_vec()),
            TensorData::Int64(values) => TensorData::Int64(values[start..end].to_vec()),
            TensorData::Bytes(values) => TensorData::Bytes(values[start..end].to_vec()),
        }
    }

    /// Appends `other`'s elements; both must have the same type.
    fn extend(&mut self, other: &TensorData) -> bool {
        match (self, other) {
            (TensorData::Fp32(values), TensorData::Fp32(more)) => values.extend_from_slice(more),
            (TensorData::Int64(values), TensorData::Int64(more)) => values.extend_from_slice(more),
            (TensorData::Bytes(values), TensorData::Bytes(more)) => values.extend_from_slice(more),
            _ => return false,
        }
        true
    }
}

/// A named tensor. The first dimension is the batch (rows).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl NamedTensor {
    /// Rows in the batch dimension (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row.
    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// Why inputs do not fit a signature. Each is the caller's mistake: HTTP 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("missing input {0:?}")]
    Missing(String),
    #[error("unexpected input {name:?}; this model takes {expected}")]
    Unexpected { name: String, expected: String },
    #[error("input {name:?} is {given}, expected {expected}")]
    WrongDatatype {
        name: String,
        given: &'static str,
        expected: &'static str,
    },
    #[error("input {name:?} has shape {given:?}, expected {expected:?} (-1 is any size)")]
    WrongShape {
        name: String,
        given: Vec<usize>,
        expected: Vec<i64>,
    },
    #[error("input {name:?} has {given} elements but shape {shape:?} needs {needed}")]
    WrongLength {
        name: String,
        shape: Vec<usize>,
        given: usize,
        needed: usize,
    },
    #[error("inputs disagree on the batch size: {0:?}")]
    RowsDisagree(Vec<usize>),
    #[error("batch of {given} rows is over the limit of {limit}")]
    TooManyRows { given: usize, limit: usize },
    #[error("input {0:?} has no rows")]
    Empty(String),
}

/// Checks `inputs` against `signature` and returns the number of rows.
pub fn validate_inputs(signature: &Signature, inputs: &[NamedTensor]) -> Result<usize, InputError> {
    let expected_names = || {
        signature
            .inputs
            .iter()
            .map(|spec| spec.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for input in inputs {
        if !signature.inputs.iter().any(|spec| spec.name == input.name) {
            return Err(InputError::Unexpected {
                name: input.name.clone(),
                expected: expected_names(),
            });
        }
    }
    let mut rows = Vec::with_capacity(signature.inputs.len());
    for spec in &signature.inputs {
        let Some(input) = inputs.iter().find(|input| input.name == spec.name) else {
            return Err(InputError::Missing(spec.name.clone()));
        };
        check_one(spec, input)?;
        rows.push(input.rows());
    }
    match rows.first() {
        None => Ok(0),
        Some(&first) if rows.iter().all(|&r| r == first) => Ok(first),
        Some(_) => Err(InputError::RowsDisagree(rows)),
    }
}

fn check_one(spec: &TensorSpec, input: &NamedTensor) -> Result<(), InputError> {
    if input.data.datatype() != spec.datatype {
        return Err(InputError::WrongDatatype {
            name: input.name.clone(),
            given: input.data.datatype().as_str(),
            expected: spec.datatype.as_str(),
        });
    }
    let shape_fits = input.shape.len() == spec.shape.len()
        && input
            .shape
            .iter()
            .zip(&spec.shape)
            .all(|(&given, &wanted)| wanted < 0 || given as i64 == wanted);
    if !shape_fits {
        return Err(InputError::WrongShape {
            name: input.name.clone(),
            given: input.shape.clone(),
            expected: spec.shape.clone(),
        });
    }
    let needed: usize = input.shape.iter().product();
    if needed != input.data.len() {
        return Err(InputError::WrongLength {
            name: input.name.clone(),
            shape: input.shape.clone(),
            given: input.data.len(),
            needed,
        });
    }
    if input.rows() == 0 {
        return Err(InputError::Empty(input.name.clone()));
    }
    Ok(())
}

/// Concatenates several requests' inputs along the batch dimension, input by input.
/// All requests were validated against the same signature, so names and types agree.
pub fn concat_rows(requests: &[&[NamedTensor]]) -> Vec<NamedTensor> {
    let Some((first, rest)) = requests.split_first() else {
        return Vec::new();
    };
    let mut merged: Vec<NamedTensor> = first.to_vec();
    for request in rest {
        for tensor in merged.iter_mut() {
            if let Some(more) = request.iter().find(|input| input.name == tensor.name)
                && tensor.data.extend(&more.data)
            {
                tensor.shape[0] += more.rows();
            }
        }
    }
    merged
}

/// Splits batched outputs back into one output list per request, by each request's rows.
pub fn split_rows(outputs: &[NamedTensor], rows_per_request: &[usize]) -> Vec<Vec<NamedTensor>> {
    let mut split = vec![Vec::with_capacity(outputs.len()); rows_per_request.len()];
    for output in outputs {
        let row_len = output.row_len();
        let mut start_row = 0;
        for (request, &rows) in rows_per_request.iter().enumerate() {
            let mut shape = output.shape.clone();
            if let Some(batch) = shape.first_mut() {
                *batch = rows;
            }
            split[request].push(NamedTensor {
                name: output.name.clone(),
                shape,
                data: output
                    .data
                    .slice(start_row * row_len, (start_row + rows) * row_len),
            });
            start_row += rows;
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(rows: usize, values: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: "features".into(),
            shape: vec![rows, 2],
            data: TensorData::Fp32(values),
        }
    }

    fn signature() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "features".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 2],
            }],
            outputs: vec![],
        }
    }

    #[test]
    fn inputs_that_fit_the_signature_give_their_rows() {
        let inputs = [features(2, vec![1.0, 2.0, 3.0, 4.0])];
        assert_eq!(validate_inputs(&signature(), &inputs), Ok(2));
    }

    #[test]
    fn each_kind_of_misfit_is_named() {
        let sig = signature();
        let wrong_name = NamedTensor {
            name: "x".into(),
            ..features(1, vec![1.0, 2.0])
        };
        assert!(matches!(
            validate_inputs(&sig, &[wrong_name]),
            Err(InputError::Unexpected { .. })
        ));
        assert_eq!(
            validate_inputs(&sig, &[]),
            Err(InputError::Missing("features".into()))
        );
        let wrong_type = NamedTensor {
            data: TensorData::Int64(vec![1, 2]),
            ..features(1, vec![])
        };
        assert!(matches!(
            validate_inputs(&sig, &[wrong_type]),
            Err(InputError::WrongDatatype { .. })
        ));
        let wrong_shape = NamedTensor {
            shape: vec![1, 3],
            ..features(1, vec![1.0, 2.0, 3.0])
        };
        assert!(matches!(
            validate_inputs(&sig, &[wrong_shape]),
            Err(InputError::WrongShape { .. })
        ));
        assert!(matches!(
            validate_inputs(&sig, &[features(2, vec![1.0, 2.0])]),
            Err(InputError::WrongLength { .. })
        ));
        assert!(matches!(
            validate_inputs(&sig, &[features(0, vec![])]),
            Err(InputError::Empty(_))
        ));
    }

    #[test]
    fn concat_then_split_gives_each_request_its_own_rows() {
        let a = [features(1, vec![1.0, 2.0])];
        let b = [features(2, vec![3.0, 4.0, 5.0, 6.0])];
        let merged = concat_rows(&[&a, &b]);
        assert_eq!(merged[0].shape, vec![3, 2]);
        let split = split_rows(&merged, &[1, 2]);
        assert_eq!(split[0], a.to_vec());
        assert_eq!(split[1], b.to_vec());
    }
}
