//! The device manager: one memory ledger per device on this host, behind an actor.
//!
//! The host's RAM is the CPU device (`DeviceId(0)`); each CUDA GPU the driver reports is
//! `DeviceId(1 + ordinal)`. Reservations never exceed a device's capacity less the
//! configured headroom; when one does not fit and the policy allows, idle replicas are
//! evicted least recently used first, and the agent is told to stop them.

use crate::ledger::{Ledger, ReserveError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use shoal_scheduler::{Device, DeviceId, DeviceKind, ReplicaId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The CPU device's id; GPUs follow it.
pub const CPU_DEVICE: DeviceId = DeviceId(0);

/// The devices of this host: its RAM as device 0, then every GPU the CUDA driver reports
/// when this build can serve on GPUs (the `cuda` feature). A build without CUDA logs the
/// GPUs it sees and serves on the CPU.
pub fn discover_devices() -> Vec<Device> {
    let mut devices = vec![Device {
        id: CPU_DEVICE,
        kind: DeviceKind::Cpu,
        memory_bytes: host_memory().total_bytes,
    }];
    for gpu in probe_gpus() {
        if cfg!(feature = "cuda") {
            devices.push(Device {
                id: gpu_device_id(gpu.ordinal),
                kind: DeviceKind::Gpu,
                memory_bytes: gpu.total_bytes,
            });
        } else {
            tracing::warn!(
                ordinal = gpu.ordinal,
                name = %gpu.name,
                "gpu found but this build has no cuda feature; serving on the cpu"
            );
        }
    }
    devices
}

/// The ledger id of CUDA device `ordinal`.
pub fn gpu_device_id(ordinal: usize) -> DeviceId {
    DeviceId(1 + u32::try_from(ordinal).unwrap_or(u32::MAX - 1))
}

/// The CUDA ordinal of a GPU device id; `None` for the CPU.
pub fn cuda_ordinal(device: DeviceId) -> Option<usize> {
    (device.0 >= 1).then(|| device.0 as usize - 1)
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuMemory {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Whether the CUDA driver library can be loaded. cudarc panics on any driver call when
/// it cannot, so every call below is behind this check.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library; it calls nothing in it.
    #[allow(
        unsafe_code,
        reason = "cudarc's library probe is an unsafe fn; it only dlopens"
    )]
    unsafe {
        cudarc::driver::sys::is_culib_present()
    }
}

/// Every GPU the CUDA driver reports, with its memory (`cuMemGetInfo`). Empty when no
/// driver is installed or it reports no device.
pub fn probe_gpus() -> Vec<GpuMemory> {
    if !cuda_driver_present() {
        return Vec::new();
    }
    let count = match cudarc::driver::CudaContext::device_count() {
        Ok(count) => usize::try_from(count).unwrap_or(0),
        Err(error) => {
            tracing::info!(%error, "cuda driver present but reports no device");
            return Vec::new();
        }
    };
    (0..count).filter_map(gpu_memory).collect()
}

/// One GPU's memory now, from the driver. `None` without a driver or that device.
pub fn gpu_memory(ordinal: usize) -> Option<GpuMemory> {
    if !cuda_driver_present() {
        return None;
    }
    let context = cudarc::driver::CudaContext::new(ordinal)
        .inspect_err(|error| tracing::warn!(ordinal, %error, "cannot open cuda device"))
        .ok()?;
    let (free_bytes, total_bytes) = context.mem_get_info().ok()?;
    Some(GpuMemory {
        ordinal,
        name: context.name().unwrap_or_else(|_| format!("cuda:{ordinal}")),
        total_bytes: total_bytes as u64,
        free_bytes: free_bytes as u64,
    })
}

/// The host's RAM from `/proc/meminfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    pub total_bytes: u64,
    /// What the kernel says is available; `None` where that cannot be read.
    pub available_bytes: Option<u64>,
}

/// Total and available RAM; 1 GiB total where `/proc/meminfo` cannot be read (not Linux).
pub fn host_memory() -> HostMemory {
    const FALLBACK_BYTES: u64 = 1 << 30;
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    HostMemory {
        total_bytes: field("MemTotal:").unwrap_or(FALLBACK_BYTES),
        available_bytes: field("MemAvailable:"),
    }
}

/// Bytes the device's own allocator reports in use: the driver's for a GPU, the kernel's
/// for RAM. `None` where it cannot be read.
fn used_bytes(device: &Device) -> Option<u64> {
    match device.kind {
        DeviceKind::Cpu => {
            let memory = host_memory();
            Some(memory.total_bytes - memory.available_bytes?.min(memory.total_bytes))
        }
        DeviceKind::Gpu => {
            let gpu = gpu_memory(cuda_ordinal(device.id)?)?;
            Some(gpu.total_bytes - gpu.free_bytes.min(gpu.total_bytes))
        }
    }
}

/// How the manager hands out memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePolicy {
    /// Percent of each device's capacity never reserved: room for the runtime's own
    /// allocations, the CUDA context and fragmentation.
    pub headroom_percent: u8,
    /// Whether a reservation that does not fit may evict idle replicas, least recently
    /// used first.
    pub evict_idle: bool,
}

impl Default for DevicePolicy {
    /// No headroom and no eviction: exactly what the control plane was told the devices hold.
    fn default() -> Self {
        DevicePolicy {
            headroom_percent: 0,
            evict_idle: false,
        }
    }
}

impl DevicePolicy {
    pub fn headroom_bytes(&self, capacity_bytes: u64) -> u64 {
        capacity_bytes / 100 * u64::from(self.headroom_percent.min(100))
    }

    /// What a device offers the scheduler under this policy: capacity less headroom.
    pub fn schedulable(&self, device: &Device) -> Device {
        Device {
            memory_bytes: device.memory_bytes - self.headroom_bytes(device.memory_bytes),
            ..device.clone()
        }
    }
}

/// Milliseconds since this process first asked; the clock of replica activity.
pub fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A replica's running tally of requests, kept by its batcher and read by the device
/// manager when it looks for idle replicas to evict. Atomics, not a lock: the batcher
/// bumps them on every request.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicU64,
    last_used_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(monotonic_ms()),
        })
    }

    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms
            .fetch_max(monotonic_ms(), Ordering::Relaxed);
    }

    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.last_used_ms
            .fetch_max(monotonic_ms(), Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }
}

/// One device's ledger as the manager sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device: Device,
    pub reserved_bytes: u64,
    pub headroom_bytes: u64,
    /// In use by anyone, as the driver or kernel reports it; `None` where unreadable.
    pub used_bytes: Option<u64>,
    pub evictions_total: u64,
}

/// Called with each replica evicted to make room; the agent stops it.
pub type EvictionSink = Arc<dyn Fn(ReplicaId, DeviceId) + Send + Sync>;

pub enum DeviceMsg {
    Reserve {
        replica: ReplicaId,
        device: DeviceId,
        bytes: u64,
        activity: Option<Arc<Activity>>,
        reply: RpcReplyPort<Result<Device, DeviceError>>,
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

/// What the manager is started with.
pub struct DeviceManagerArgs {
    /// This host's node id, for metric labels.
    pub node: String,
    pub devices: Vec<Device>,
    pub policy: DevicePolicy,
    /// Told about every eviction; `None` where nobody stops evicted replicas (tests).
    pub on_evict: Option<EvictionSink>,
}

/// The actor. Holds no state of its own; the ledgers live in [`DeviceState`].
#[derive(Debug)]
pub struct DeviceManager;

pub struct DeviceState {
    node: String,
    devices: Vec<Device>,
    ledgers: Vec<Ledger>,
    policy: DevicePolicy,
    /// Each reserving replica's activity tally, read when looking for idle ones.
    activity: BTreeMap<ReplicaId, Arc<Activity>>,
    on_evict: Option<EvictionSink>,
}

impl DeviceState {
    fn index_of(&self, device: DeviceId) -> Option<usize> {
        self.devices.iter().position(|d| d.id == device)
    }

    fn publish(&self, index: usize) {
        let device = self.devices[index].id.to_string();
        let label = [self.node.as_str(), &device];
        let metrics = shoal_ops::metrics::metrics();
        let reserved = i64::try_from(self.ledgers[index].reserved_bytes()).unwrap_or(i64::MAX);
        let total = i64::try_from(self.ledgers[index].capacity_bytes()).unwrap_or(i64::MAX);
        metrics
            .device_memory_reserved_bytes
            .with_label_values(&label)
            .set(reserved);
        metrics
            .device_memory_total_bytes
            .with_label_values(&label)
            .set(total);
        if let Some(used) = used_bytes(&self.devices[index]) {
            metrics
                .device_memory_used_bytes
                .with_label_values(&label)
                .set(i64::try_from(used).unwrap_or(i64::MAX));
        }
        // The ledger keeps the running total; the counter catches up to it.
        let evictions = metrics.device_evictions_total.with_label_values(&label);
        let counted = evictions.get();
        evictions.inc_by(
            self.ledgers[index]
                .evictions_total()
                .saturating_sub(counted),
        );
    }

    fn reserve(
        &mut self,
        replica: ReplicaId,
        device: DeviceId,
        bytes: u64,
        activity: Option<Arc<Activity>>,
    ) -> Result<Device, DeviceError> {
        let index = self
            .index_of(device)
            .ok_or(DeviceError::UnknownDevice(device))?;
        let now_ms = monotonic_ms();
        let ledger = &mut self.ledgers[index];
        let result = if self.policy.evict_idle {
            for (id, tally) in &self.activity {
                ledger.set_activity(*id, tally.in_flight(), tally.last_used_ms());
            }
            ledger.reserve_evicting(replica, bytes, now_ms)
        } else {
            ledger.reserve(replica, bytes, now_ms).map(|()| Vec::new())
        };
        let victims = result.map_err(|source| DeviceError::Reserve { device, source })?;
        for victim in victims {
            tracing::info!(%victim, %device, for_replica = %replica, "evicting idle replica");
            self.activity.remove(&victim);
            if let Some(sink) = &self.on_evict {
                sink(victim, device);
            }
        }
        if let Some(activity) = activity {
            self.activity.insert(replica, activity);
        }
        self.publish(index);
        Ok(self.devices[index].clone())
    }
}

impl Actor for DeviceManager {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceManagerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DeviceMsg>,
        args: DeviceManagerArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        let ledgers = args
            .devices
            .iter()
            .map(|d| {
                Ledger::with_headroom(d.memory_bytes, args.policy.headroom_bytes(d.memory_bytes))
            })
            .collect();
        let state = DeviceState {
            node: args.node,
            devices: args.devices,
            ledgers,
            policy: args.policy,
            activity: BTreeMap::new(),
            on_evict: args.on_evict,
        };
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
                activity,
                reply,
            } => {
                let result = state.reserve(replica, device, bytes, activity);
                if reply.send(result).is_err() {
                    // The caller gave up waiting and will not load: undo the reservation.
                    if let Some(index) = state.index_of(device) {
                        state.ledgers[index].release(replica);
                        state.activity.remove(&replica);
                        state.publish(index);
                    }
                }
            }
            DeviceMsg::Release { replica, device } => {
                if let Some(index) = state.index_of(device) {
                    state.ledgers[index].release(replica);
                    state.activity.remove(&replica);
                    state.publish(index);
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
                        headroom_bytes: ledger.headroom_bytes(),
                        used_bytes: used_bytes(device),
                        evictions_total: ledger.evictions_total(),
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

    /// Starts a manager that is not linked to any supervisor (tests, tools).
    pub async fn start(args: DeviceManagerArgs) -> Result<DeviceHandle, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(None, DeviceManager, args).await?;
        Ok(DeviceHandle::new(actor))
    }

    pub(crate) fn actor_id(&self) -> ractor::ActorId {
        self.actor.get_id()
    }

    /// Reserves `bytes` on `device` for `replica` and returns the device. `activity`, when
    /// given, is how the manager later tells whether the replica is idle.
    pub async fn reserve(
        &self,
        replica: ReplicaId,
        device: DeviceId,
        bytes: u64,
        activity: Option<Arc<Activity>>,
    ) -> Result<Device, DeviceError> {
        ractor::call!(self.actor, |reply| DeviceMsg::Reserve {
            replica,
            device,
            bytes,
            activity,
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

    /// Stops the manager (tests, tools).
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn cpu(bytes: u64) -> Vec<Device> {
        vec![Device {
            id: CPU_DEVICE,
            kind: DeviceKind::Cpu,
            memory_bytes: bytes,
        }]
    }

    #[test]
    fn this_host_has_a_cpu_device_and_no_gpu_without_cuda() {
        let devices = discover_devices();
        assert_eq!(devices[0].id, CPU_DEVICE);
        assert!(devices[0].memory_bytes > 0);
        if !cfg!(feature = "cuda") {
            assert_eq!(devices.len(), 1);
        }
    }

    #[tokio::test]
    async fn the_manager_keeps_headroom_and_reports_usage() {
        let policy = DevicePolicy {
            headroom_percent: 10,
            evict_idle: false,
        };
        let manager = DeviceHandle::start(DeviceManagerArgs {
            node: "test".into(),
            devices: cpu(1_000),
            policy,
            on_evict: None,
        })
        .await
        .unwrap();
        assert!(
            manager
                .reserve(ReplicaId(1), CPU_DEVICE, 901, None)
                .await
                .is_err()
        );
        manager
            .reserve(ReplicaId(1), CPU_DEVICE, 900, None)
            .await
            .unwrap();
        assert_eq!(
            manager.reserve(ReplicaId(2), DeviceId(9), 1, None).await,
            Err(DeviceError::UnknownDevice(DeviceId(9)))
        );
        let usage = manager.usage().await.unwrap();
        assert_eq!(usage[0].reserved_bytes, 900);
        assert_eq!(usage[0].headroom_bytes, 100);
        assert!(usage[0].used_bytes.is_some(), "linux reports used RAM");
        manager.release(ReplicaId(1), CPU_DEVICE);
        assert_eq!(manager.usage().await.unwrap()[0].reserved_bytes, 0);
        manager.stop();
    }

    #[tokio::test]
    async fn a_reservation_that_needs_room_evicts_the_idle_replica_and_says_so() {
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let sink_evicted = Arc::clone(&evicted);
        let manager = DeviceHandle::start(DeviceManagerArgs {
            node: "test".into(),
            devices: cpu(100),
            policy: DevicePolicy {
                headroom_percent: 0,
                evict_idle: true,
            },
            on_evict: Some(Arc::new(move |replica, _| {
                sink_evicted.lock().unwrap().push(replica)
            })),
        })
        .await
        .unwrap();
        let busy = Activity::new();
        let idle = Activity::new();
        manager
            .reserve(ReplicaId(1), CPU_DEVICE, 50, Some(busy.clone()))
            .await
            .unwrap();
        manager
            .reserve(ReplicaId(2), CPU_DEVICE, 50, Some(idle.clone()))
            .await
            .unwrap();
        busy.begin();
        manager
            .reserve(ReplicaId(3), CPU_DEVICE, 50, None)
            .await
            .unwrap();
        assert_eq!(*evicted.lock().unwrap(), vec![ReplicaId(2)]);
        assert!(
            manager
                .reserve(ReplicaId(4), CPU_DEVICE, 60, None)
                .await
                .is_err(),
            "replica 1 is busy and 3 alone frees too little"
        );
        let usage = manager.usage().await.unwrap();
        assert_eq!(
            (usage[0].reserved_bytes, usage[0].evictions_total),
            (100, 1)
        );
        manager.stop();
    }
}
