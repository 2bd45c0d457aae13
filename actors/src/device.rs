//! The device manager: one memory ledger per device on this host, behind an actor.
//!
//! The host's RAM is the CPU device. GPUs (cudarc) join with the `cuda` work in a later
//! change; the ledger does not care which kind of memory it counts.

use crate::ledger::{Ledger, ReserveError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use shoal_scheduler::{Device, DeviceId, DeviceKind, ReplicaId};

/// The devices of this host: for now its RAM, as device 0.
pub fn discover_devices() -> Vec<Device> {
    vec![Device {
        id: DeviceId(0),
        kind: DeviceKind::Cpu,
        memory_bytes: host_memory_bytes(),
    }]
}

/// Total RAM from `/proc/meminfo`; 1 GiB where that cannot be read (not Linux).
fn host_memory_bytes() -> u64 {
    const FALLBACK_BYTES: u64 = 1 << 30;
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(FALLBACK_BYTES)
}

/// One device's ledger as the manager sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device: Device,
    pub reserved_bytes: u64,
}

pub enum DeviceMsg {
    Reserve {
        replica: ReplicaId,
        device: DeviceId,
        bytes: u64,
        reply: RpcReplyPort<Result<(), DeviceError>>,
    },
    Release {
        replica: ReplicaId,
        device: DeviceId,
    },
    Usage {
        reply: RpcReplyPort<Vec<DeviceUsage>>,
    },
}

/// Why a device request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("no device {0} on this host")]
    UnknownDevice(DeviceId),
    #[error("device {device}: {source}")]
    Reserve {
        device: DeviceId,
        #[source]
        source: ReserveError,
    },
    #[error("the device manager is not running")]
    Unavailable,
}

/// The actor. Holds no state of its own; the ledgers live in [`DeviceState`].
#[derive(Debug)]
pub struct DeviceManager;

#[derive(Debug)]
pub struct DeviceState {
    devices: Vec<Device>,
    ledgers: Vec<Ledger>,
}

impl DeviceState {
    fn publish(&self, index: usize) {
        let label = self.devices[index].id.to_string();
        let metrics = shoal_ops::metrics::metrics();
        let reserved = i64::try_from(self.ledgers[index].reserved_bytes()).unwrap_or(i64::MAX);
        let total = i64::try_from(self.ledgers[index].capacity_bytes()).unwrap_or(i64::MAX);
        metrics
            .device_memory_reserved_bytes
            .with_label_values(&[&label])
            .set(reserved);
        metrics
            .device_memory_total_bytes
            .with_label_values(&[&label])
            .set(total);
    }
}

impl Actor for DeviceManager {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = Vec<Device>;

    async fn pre_start(
        &self,
        _myself: ActorRef<DeviceMsg>,
        devices: Vec<Device>,
    ) -> Result<DeviceState, ActorProcessingErr> {
        let ledgers = devices
            .iter()
            .map(|d| Ledger::new(d.memory_bytes))
            .collect();
        let state = DeviceState { devices, ledgers };
        for index in 0..state.devices.len() {
            state.publish(index);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<DeviceMsg>,
        message: DeviceMsg,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DeviceMsg::Reserve {
                replica,
                device,
                bytes,
                reply,
            } => {
                let result = match state.ledgers.get_mut(device.0 as usize) {
                    None => Err(DeviceError::UnknownDevice(device)),
                    Some(ledger) => ledger
                        .reserve(replica, bytes)
                        .map_err(|source| DeviceError::Reserve { device, source }),
                };
                if result.is_ok() {
                    state.publish(device.0 as usize);
                }
                // The caller may have given up waiting; nothing to undo then but the
                // reservation, which it releases on stop.
                let _ = reply.send(result);
            }
            DeviceMsg::Release { replica, device } => {
                if let Some(ledger) = state.ledgers.get_mut(device.0 as usize) {
                    ledger.release(replica);
                    state.publish(device.0 as usize);
                }
            }
            DeviceMsg::Usage { reply } => {
                let usage = state
                    .devices
                    .iter()
                    .zip(&state.ledgers)
                    .map(|(device, ledger)| DeviceUsage {
                        device: device.clone(),
                        reserved_bytes: ledger.reserved_bytes(),
                    })
                    .collect();
                let _ = reply.send(usage);
            }
        }
        Ok(())
    }
}

/// What callers hold: typed async methods over the manager's mailbox.
#[derive(Clone, Debug)]
pub struct DeviceHandle {
    actor: ActorRef<DeviceMsg>,
}

impl DeviceHandle {
    pub fn new(actor: ActorRef<DeviceMsg>) -> DeviceHandle {
        DeviceHandle { actor }
    }

    pub(crate) fn actor_id(&self) -> ractor::ActorId {
        self.actor.get_id()
    }

    pub async fn reserve(
        &self,
        replica: ReplicaId,
        device: DeviceId,
        bytes: u64,
    ) -> Result<(), DeviceError> {
        ractor::call!(self.actor, |reply| DeviceMsg::Reserve {
            replica,
            device,
            bytes,
            reply
        })
        .map_err(|_| DeviceError::Unavailable)?
    }

    /// Frees a replica's reservation. Fire and forget: a manager that is gone holds nothing.
    pub fn release(&self, replica: ReplicaId, device: DeviceId) {
        let _ = self.actor.cast(DeviceMsg::Release { replica, device });
    }

    pub async fn usage(&self) -> Result<Vec<DeviceUsage>, DeviceError> {
        ractor::call!(self.actor, |reply| DeviceMsg::Usage { reply })
            .map_err(|_| DeviceError::Unavailable)
    }
}
