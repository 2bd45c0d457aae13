//! One device's memory ledger: who holds how many bytes, and whom to evict. Pure bookkeeping.
//!
//! The invariant: the sum of reservations never exceeds capacity minus headroom. Time comes
//! in as an argument (`now_ms`), so eviction order is deterministic and testable.

use shoal_scheduler::ReplicaId;
use std::collections::BTreeMap;

/// Why a reservation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    #[error("{needed_bytes} bytes needed, {free_bytes} free of {capacity_bytes}")]
    Insufficient {
        needed_bytes: u64,
        free_bytes: u64,
        capacity_bytes: u64,
    },
}

/// What the ledger knows about one reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reservation {
    bytes: u64,
    /// Requests the replica is working on; only a replica with none may be evicted.
    in_flight: u64,
    /// When the replica last finished or took a request (or reserved), for LRU order.
    last_used_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ledger {
    capacity_bytes: u64,
    /// Bytes never handed out: room for the runtime's own allocations and fragmentation.
    headroom_bytes: u64,
    reservations: BTreeMap<ReplicaId, Reservation>,
    evictions_total: u64,
}

impl Ledger {
    /// A ledger with no headroom.
    pub fn new(capacity_bytes: u64) -> Ledger {
        Ledger::with_headroom(capacity_bytes, 0)
    }

    /// A ledger that keeps `headroom_bytes` of `capacity_bytes` unreserved (capped at capacity).
    pub fn with_headroom(capacity_bytes: u64, headroom_bytes: u64) -> Ledger {
        Ledger {
            capacity_bytes,
            headroom_bytes: headroom_bytes.min(capacity_bytes),
            reservations: BTreeMap::new(),
            evictions_total: 0,
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn headroom_bytes(&self) -> u64 {
        self.headroom_bytes
    }

    /// What may be reserved in all: capacity less headroom.
    pub fn reservable_bytes(&self) -> u64 {
        self.capacity_bytes - self.headroom_bytes
    }

    pub fn reserved_bytes(&self) -> u64 {
        self.reservations.values().map(|r| r.bytes).sum()
    }

    pub fn free_bytes(&self) -> u64 {
        self.reservable_bytes() - self.reserved_bytes()
    }

    /// Replicas evicted from this ledger since it was created.
    pub fn evictions_total(&self) -> u64 {
        self.evictions_total
    }

    /// Bytes `replica` holds, if it holds any.
    pub fn held_bytes(&self, replica: ReplicaId) -> Option<u64> {
        self.reservations.get(&replica).map(|r| r.bytes)
    }

    /// Reserves `bytes` for `replica`, replacing what it held before. All or nothing.
    pub fn reserve(
        &mut self,
        replica: ReplicaId,
        bytes: u64,
        now_ms: u64,
    ) -> Result<(), ReserveError> {
        let held = self.held_bytes(replica).unwrap_or(0);
        let free_bytes = self.free_bytes() + held;
        if bytes > free_bytes {
            return Err(ReserveError::Insufficient {
                needed_bytes: bytes,
                free_bytes,
                capacity_bytes: self.capacity_bytes,
            });
        }
        let entry = self.reservations.entry(replica).or_insert(Reservation {
            bytes: 0,
            in_flight: 0,
            last_used_ms: now_ms,
        });
        entry.bytes = bytes;
        entry.last_used_ms = now_ms;
        self.assert_within_capacity();
        Ok(())
    }

    /// Like [`Ledger::reserve`], but makes room first by evicting idle replicas, least
    /// recently used first, when that is enough. Returns the evicted replicas (whose
    /// reservations are gone). Refuses, changing nothing, when even evicting every idle
    /// replica would not make room.
    pub fn reserve_evicting(
        &mut self,
        replica: ReplicaId,
        bytes: u64,
        now_ms: u64,
    ) -> Result<Vec<ReplicaId>, ReserveError> {
        let victims = self.eviction_plan(replica, bytes)?;
        for victim in &victims {
            self.reservations.remove(victim);
            self.evictions_total += 1;
        }
        self.reserve(replica, bytes, now_ms)?;
        Ok(victims)
    }

    /// The idle replicas, least recently used first, whose eviction makes room for
    /// `bytes` for `replica`; empty when it fits already.
    pub fn eviction_plan(
        &self,
        replica: ReplicaId,
        bytes: u64,
    ) -> Result<Vec<ReplicaId>, ReserveError> {
        let held = self.held_bytes(replica).unwrap_or(0);
        let mut free_bytes = self.free_bytes() + held;
        if bytes <= free_bytes {
            return Ok(Vec::new());
        }
        let mut idle: Vec<(u64, ReplicaId, u64)> = self
            .reservations
            .iter()
            .filter(|(id, r)| **id != replica && r.in_flight == 0)
            .map(|(id, r)| (r.last_used_ms, *id, r.bytes))
            .collect();
        idle.sort_unstable();
        let mut victims = Vec::new();
        for (_, victim, victim_bytes) in idle {
            if bytes <= free_bytes {
                break;
            }
            free_bytes += victim_bytes;
            victims.push(victim);
        }
        if bytes > free_bytes {
            return Err(ReserveError::Insufficient {
                needed_bytes: bytes,
                free_bytes: self.free_bytes() + held,
                capacity_bytes: self.capacity_bytes,
            });
        }
        Ok(victims)
    }

    /// Records that `replica` took a request at `now_ms`.
    pub fn begin_use(&mut self, replica: ReplicaId, now_ms: u64) {
        if let Some(reservation) = self.reservations.get_mut(&replica) {
            reservation.in_flight += 1;
            reservation.last_used_ms = reservation.last_used_ms.max(now_ms);
        }
    }

    /// Records that `replica` finished a request at `now_ms`.
    pub fn end_use(&mut self, replica: ReplicaId, now_ms: u64) {
        if let Some(reservation) = self.reservations.get_mut(&replica) {
            reservation.in_flight = reservation.in_flight.saturating_sub(1);
            reservation.last_used_ms = reservation.last_used_ms.max(now_ms);
        }
    }

    /// Sets what `replica` is doing from an outside count (the replica's own tally).
    pub fn set_activity(&mut self, replica: ReplicaId, in_flight: u64, last_used_ms: u64) {
        if let Some(reservation) = self.reservations.get_mut(&replica) {
            reservation.in_flight = in_flight;
            reservation.last_used_ms = reservation.last_used_ms.max(last_used_ms);
        }
    }

    /// Frees what `replica` holds; returns how many bytes that was.
    pub fn release(&mut self, replica: ReplicaId) -> u64 {
        self.reservations.remove(&replica).map_or(0, |r| r.bytes)
    }

    fn assert_within_capacity(&self) {
        debug_assert!(
            self.reserved_bytes() <= self.reservable_bytes(),
            "ledger over-committed: {} reserved of {} reservable",
            self.reserved_bytes(),
            self.reservable_bytes()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Reserve(u64, u64),
        ReserveEvicting(u64, u64),
        Begin(u64),
        End(u64),
        Release(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..8, 0u64..600).prop_map(|(replica, bytes)| Op::Reserve(replica, bytes)),
            (0u64..8, 0u64..900).prop_map(|(replica, bytes)| Op::ReserveEvicting(replica, bytes)),
            (0u64..8).prop_map(Op::Begin),
            (0u64..8).prop_map(Op::End),
            (0u64..8).prop_map(Op::Release),
        ]
    }

    proptest! {
        // proptest prints the failing case and its seed, and replays it from
        // proptest-regressions/ when one is found.
        #[test]
        fn random_reserve_release_evict_never_exceeds_capacity_less_headroom(
            headroom in 0u64..300,
            ops in prop::collection::vec(op(), 0..200),
        ) {
            let mut ledger = Ledger::with_headroom(1_000, headroom);
            for (now_ms, op) in ops.into_iter().enumerate() {
                let now_ms = now_ms as u64;
                let before = ledger.clone();
                match op {
                    Op::Reserve(replica, bytes) => {
                        if ledger.reserve(ReplicaId(replica), bytes, now_ms).is_err() {
                            prop_assert_eq!(&ledger, &before, "a refused reservation changes nothing");
                        }
                    }
                    Op::ReserveEvicting(replica, bytes) => {
                        match ledger.reserve_evicting(ReplicaId(replica), bytes, now_ms) {
                            Err(_) => prop_assert_eq!(&ledger, &before, "a refusal evicts nothing"),
                            Ok(victims) => {
                                for victim in &victims {
                                    let held = before.reservations.get(victim);
                                    prop_assert!(held.is_some_and(|r| r.in_flight == 0), "only idle replicas are evicted");
                                    prop_assert!(*victim != ReplicaId(replica));
                                }
                                // LRU: every idle survivor was used no earlier than any victim.
                                let newest_victim = victims.iter().filter_map(|v| before.reservations.get(v)).map(|r| r.last_used_ms).max();
                                if let Some(newest_victim) = newest_victim {
                                    for (id, r) in &before.reservations {
                                        if r.in_flight == 0 && !victims.contains(id) && *id != ReplicaId(replica) {
                                            prop_assert!(r.last_used_ms >= newest_victim, "evicted in LRU order");
                                        }
                                    }
                                }
                                prop_assert_eq!(ledger.evictions_total(), before.evictions_total() + victims.len() as u64);
                            }
                        }
                    }
                    Op::Begin(replica) => ledger.begin_use(ReplicaId(replica), now_ms),
                    Op::End(replica) => ledger.end_use(ReplicaId(replica), now_ms),
                    Op::Release(replica) => {
                        let freed = ledger.release(ReplicaId(replica));
                        prop_assert_eq!(ledger.reserved_bytes() + freed, before.reserved_bytes());
                    }
                }
                prop_assert!(ledger.reserved_bytes() <= ledger.capacity_bytes() - ledger.headroom_bytes());
            }
        }
    }

    #[test]
    fn a_replica_can_resize_its_own_reservation() {
        let mut ledger = Ledger::new(100);
        ledger.reserve(ReplicaId(1), 80, 0).unwrap();
        ledger.reserve(ReplicaId(1), 100, 0).unwrap();
        assert_eq!(
            ledger.reserve(ReplicaId(2), 1, 0),
            Err(ReserveError::Insufficient {
                needed_bytes: 1,
                free_bytes: 0,
                capacity_bytes: 100
            })
        );
        assert_eq!(ledger.release(ReplicaId(1)), 100);
        assert_eq!(ledger.free_bytes(), 100);
    }

    #[test]
    fn headroom_is_never_handed_out() {
        let mut ledger = Ledger::with_headroom(100, 10);
        assert!(ledger.reserve(ReplicaId(1), 91, 0).is_err());
        ledger.reserve(ReplicaId(1), 90, 0).unwrap();
        assert_eq!(ledger.free_bytes(), 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_idle_replicas_first() {
        let mut ledger = Ledger::new(100);
        ledger.reserve(ReplicaId(1), 30, 10).unwrap();
        ledger.reserve(ReplicaId(2), 30, 5).unwrap();
        ledger.reserve(ReplicaId(3), 30, 1).unwrap();
        // Replica 3 is the oldest but busy, so 2 goes first, then 1.
        ledger.begin_use(ReplicaId(3), 1);
        assert_eq!(
            ledger.reserve_evicting(ReplicaId(4), 40, 20),
            Ok(vec![ReplicaId(2)])
        );
        assert_eq!(
            ledger.reserve_evicting(ReplicaId(5), 80, 21),
            Err(ReserveError::Insufficient {
                needed_bytes: 80,
                free_bytes: 0,
                capacity_bytes: 100
            }),
            "evicting every idle replica (1 and 4, 70 bytes) is not enough while 3 is busy"
        );
        ledger.end_use(ReplicaId(3), 22);
        assert_eq!(
            ledger.reserve_evicting(ReplicaId(5), 80, 23),
            Ok(vec![ReplicaId(1), ReplicaId(4), ReplicaId(3)])
        );
        assert_eq!(ledger.evictions_total(), 4);
        assert_eq!(ledger.reserved_bytes(), 80);
    }
}
