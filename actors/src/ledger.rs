//! One device's memory ledger: who holds how many bytes. Pure bookkeeping.
//!
//! The invariant: the sum of reservations never exceeds capacity.

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ledger {
    capacity_bytes: u64,
    reservations: BTreeMap<ReplicaId, u64>,
}

impl Ledger {
    pub fn new(capacity_bytes: u64) -> Ledger {
        Ledger {
            capacity_bytes,
            reservations: BTreeMap::new(),
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn reserved_bytes(&self) -> u64 {
        self.reservations.values().sum()
    }

    pub fn free_bytes(&self) -> u64 {
        self.capacity_bytes - self.reserved_bytes()
    }

    /// Reserves `bytes` for `replica`, replacing what it held before. All or nothing.
    pub fn reserve(&mut self, replica: ReplicaId, bytes: u64) -> Result<(), ReserveError> {
        let held = self.reservations.get(&replica).copied().unwrap_or(0);
        let free_bytes = self.free_bytes() + held;
        if bytes > free_bytes {
            return Err(ReserveError::Insufficient {
                needed_bytes: bytes,
                free_bytes,
                capacity_bytes: self.capacity_bytes,
            });
        }
        self.reservations.insert(replica, bytes);
        debug_assert!(self.reserved_bytes() <= self.capacity_bytes);
        Ok(())
    }

    /// Frees what `replica` holds; returns how many bytes that was.
    pub fn release(&mut self, replica: ReplicaId) -> u64 {
        self.reservations.remove(&replica).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Reserve(u64, u64),
        Release(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..8, 0u64..600).prop_map(|(replica, bytes)| Op::Reserve(replica, bytes)),
            (0u64..8).prop_map(Op::Release),
        ]
    }

    proptest! {
        #[test]
        fn reservations_never_exceed_capacity(ops in prop::collection::vec(op(), 0..200)) {
            let mut ledger = Ledger::new(1_000);
            for op in ops {
                let before = ledger.clone();
                match op {
                    Op::Reserve(replica, bytes) => {
                        if ledger.reserve(ReplicaId(replica), bytes).is_err() {
                            prop_assert_eq!(&ledger, &before, "a refused reservation changes nothing");
                        }
                    }
                    Op::Release(replica) => {
                        let freed = ledger.release(ReplicaId(replica));
                        prop_assert_eq!(ledger.reserved_bytes() + freed, before.reserved_bytes());
                    }
                }
                prop_assert!(ledger.reserved_bytes() <= ledger.capacity_bytes());
            }
        }
    }

    #[test]
    fn a_replica_can_resize_its_own_reservation() {
        let mut ledger = Ledger::new(100);
        ledger.reserve(ReplicaId(1), 80).unwrap();
        ledger.reserve(ReplicaId(1), 100).unwrap();
        assert_eq!(
            ledger.reserve(ReplicaId(2), 1),
            Err(ReserveError::Insufficient {
                needed_bytes: 1,
                free_bytes: 0,
                capacity_bytes: 100
            })
        );
        assert_eq!(ledger.release(ReplicaId(1)), 100);
        assert_eq!(ledger.free_bytes(), 100);
    }
}
