//! Small value types shared by the state, the commands and the crates that read them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identity of a node (an agent host) in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// A device on one node: index 0.. in the order the node reported them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

/// Identity of a replica, allocated by `apply` in log order, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev-{}", self.0)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "replica-{}", self.0)
    }
}

/// Where one shard of a replica group runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardPlacement {
    pub node: NodeId,
    pub device: DeviceId,
}

/// What kind of memory a device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// The host's RAM, used when a node has no GPU or a model runs on the CPU.
    Cpu,
    /// A CUDA device.
    Gpu,
}

/// Element type of a tensor, named as the Open Inference Protocol names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataType {
    Fp32,
    Int64,
    Bytes,
}

impl DataType {
    /// The protocol's spelling: `FP32`, `INT64`, `BYTES`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Fp32 => "FP32",
            DataType::Int64 => "INT64",
            DataType::Bytes => "BYTES",
        }
    }
}

/// Name, element type and shape of one input or output. `-1` in a shape is any size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// What a model version takes and gives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One file of a model version, addressed by the sha256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// The file's name inside the version, e.g. `model.safetensors`.
    pub name: String,
    /// Lower-case hex sha256 of the contents.
    pub digest: String,
    pub size_bytes: u64,
}

/// How a deployment's replicas group requests into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchingPolicy {
    /// Most rows one forward pass takes.
    pub batch_size_max: u32,
    /// Longest a request waits for others to join its batch, in microseconds. The default,
    /// 0, batches what is queued when the model is free, as Triton's dynamic batcher does:
    /// under load requests queue while the model is busy, so batches still fill, and a
    /// lone request never waits. (tokio's timer counts whole milliseconds, so a delay
    /// under a millisecond costs about one.)
    pub queue_delay_max_us: u64,
    /// Most requests waiting for a batch before new ones are refused as overloaded.
    pub queue_capacity: u32,
}

impl Default for BatchingPolicy {
    fn default() -> Self {
        BatchingPolicy {
            batch_size_max: 32,
            queue_delay_max_us: 0,
            queue_capacity: 1_024,
        }
    }
}
