//! A multi-layer perceptron classifier: standardise, linear + ReLU layers, softmax, label.
//!
//! Weights (safetensors): `input.mean` and `input.std` `[inputs]`, then `layers.{i}.weight`
//! `[out, in]` and `layers.{i}.bias` `[out]` for each layer. In GGUF, a weight matrix stored
//! in ggml's blocks (`Q8_0`, …) stays so, and is multiplied by as it is stored.

use super::{Architecture, ModelRuntime, Projection, RuntimeError, WeightsFile};
use crate::tensor::{NamedTensor, TensorData};
use candle_core::{D, Device, Tensor};
use candle_nn::Module;
use serde::{Deserialize, Serialize};
use shoal_scheduler::{DataType, Signature, TensorSpec};

/// config.json of an MLP classifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Always [`MlpConfig::ARCHITECTURE`].
    pub architecture: String,
    /// Name of the one FP32 input, shape `[N, layer_sizes[0]]`.
    pub input: String,
    /// Width of each layer, input first, classes last.
    pub layer_sizes: Vec<usize>,
    /// One name per class, in output order.
    pub labels: Vec<String>,
}

impl MlpConfig {
    pub const ARCHITECTURE: &'static str = "mlp_classifier";
    pub const PROBABILITIES: &'static str = "probabilities";
    pub const LABEL: &'static str = "label";

    pub fn signature(&self) -> Signature {
        let inputs_width = self.layer_sizes.first().copied().unwrap_or(0);
        Signature {
            inputs: vec![TensorSpec {
                name: self.input.clone(),
                datatype: DataType::Fp32,
                shape: vec![-1, inputs_width as i64],
            }],
            outputs: vec![
                TensorSpec {
                    name: Self::PROBABILITIES.into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1, self.labels.len() as i64],
                },
                TensorSpec {
                    name: Self::LABEL.into(),
                    datatype: DataType::Bytes,
                    shape: vec![-1],
                },
            ],
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        if self.architecture != Self::ARCHITECTURE {
            return Err(RuntimeError::Config(format!(
                "architecture is {:?}, not {:?}",
                self.architecture,
                Self::ARCHITECTURE
            )));
        }
        if self.layer_sizes.len() < 2 || self.layer_sizes.contains(&0) {
            return Err(RuntimeError::Config(
                "layer_sizes needs at least an input and an output width, none zero".into(),
            ));
        }
        if self.layer_sizes.last() != Some(&self.labels.len()) {
            return Err(RuntimeError::Config(format!(
                "{} labels for {} outputs",
                self.labels.len(),
                self.layer_sizes.last().copied().unwrap_or(0)
            )));
        }
        Ok(())
    }
}

/// A loaded MLP classifier.
#[derive(Debug)]
pub struct MlpClassifier {
    config: MlpConfig,
    signature: Signature,
    mean: Tensor,
    std: Tensor,
    layers: Vec<Projection>,
    device: Device,
}

impl MlpClassifier {
    /// Loads from config.json bytes and safetensors bytes onto the CPU.
    pub fn load(config_json: &[u8], safetensors: &[u8]) -> Result<MlpClassifier, RuntimeError> {
        MlpClassifier::load_on(
            config_json,
            WeightsFile::Safetensors(safetensors),
            &Device::Cpu,
        )
    }

    /// Loads from config.json bytes and a weights file onto `device`.
    pub fn load_on(
        config_json: &[u8],
        weights: WeightsFile<'_>,
        device: &Device,
    ) -> Result<MlpClassifier, RuntimeError> {
        let config: MlpConfig = serde_json::from_slice(config_json)
            .map_err(|error| RuntimeError::Config(error.to_string()))?;
        config.validate()?;
        let device = device.clone();
        let mut weights = weights.load(&device, |name| {
            Architecture::MlpClassifier.keeps_quantized(name)
        })?;
        let width = config.layer_sizes[0];
        let mean = weights.tensor("input.mean", &[width])?;
        let std = weights.tensor("input.std", &[width])?;
        let mut layers = Vec::new();
        for (index, pair) in config.layer_sizes.windows(2).enumerate() {
            let (fan_in, fan_out) = (pair[0], pair[1]);
            let weight = weights.matrix(&format!("layers.{index}.weight"), fan_out, fan_in)?;
            let bias = weights.tensor(&format!("layers.{index}.bias"), &[fan_out])?;
            layers.push(Projection::new(weight, Some(bias)));
        }
        Ok(MlpClassifier {
            signature: config.signature(),
            config,
            mean,
            std,
            layers,
            device,
        })
    }

    /// Class probabilities for a `[rows, width]` batch, as a `[rows, classes]` tensor.
    pub fn probabilities(&self, features: &Tensor) -> Result<Tensor, candle_core::Error> {
        let mut hidden = features
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        let last = self.layers.len() - 1;
        for (index, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(&hidden)?;
            if index < last {
                hidden = hidden.relu()?;
            }
        }
        candle_nn::ops::softmax(&hidden, D::Minus1)
    }
}

impl ModelRuntime for MlpClassifier {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn forward(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError> {
        let input = inputs
            .iter()
            .find(|input| input.name == self.config.input)
            .ok_or_else(|| RuntimeError::Input(format!("no input {:?}", self.config.input)))?;
        let TensorData::Fp32(values) = &input.data else {
            return Err(RuntimeError::Input("features must be FP32".into()));
        };
        let rows = input.rows();
        let features =
            Tensor::from_slice(values, (rows, self.config.layer_sizes[0]), &self.device)?;
        let probabilities = self.probabilities(&features)?;
        let classes: Vec<u32> = probabilities.argmax(D::Minus1)?.to_vec1()?;
        let labels = classes
            .iter()
            .map(|&class| self.config.labels[class as usize].clone())
            .collect();
        Ok(vec![
            NamedTensor {
                name: MlpConfig::PROBABILITIES.into(),
                shape: vec![rows, self.config.labels.len()],
                data: TensorData::Fp32(probabilities.flatten_all()?.to_vec1()?),
            },
            NamedTensor {
                name: MlpConfig::LABEL.into(),
                shape: vec![rows],
                data: TensorData::Bytes(labels),
            },
        ])
    }
}
