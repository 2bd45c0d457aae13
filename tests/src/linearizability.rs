//! A linearizability checker for one register, after Wing and Gong with Lowe's
//! memoisation: search for an order of the operations that respects real time (an
//! operation that returned before another was invoked comes first) and the register's
//! sequential behaviour (a read returns the latest write).
//!
//! Operations whose outcome is unknown (a write that timed out) may take effect at any
//! point after their invocation, or never. Failed operations are left out by the caller.

use std::collections::HashSet;
use std::time::Duration;

/// What an operation did to the register. Values are small integers; 0 is "unset".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write(u32),
    Read(u32),
}

/// One operation of a history, with monotonic times since the start of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    pub op: Op,
    pub invoked: Duration,
    /// `None` when the outcome is unknown.
    pub returned: Option<Duration>,
}

/// Why a history is not linearizable, or that the search gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order works; `longest` is the most operations any attempt could order.
    NotLinearizable {
        longest: usize,
    },
    /// The search visited `limit` states without an answer.
    Undecided {
        limit: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Call(usize),
    Return(usize),
}

/// Checks `history` against a register that starts at `initial`. `states_max` bounds
/// the search; histories from the tests finish far below it.
pub fn check(history: &[Operation], initial: u32, states_max: usize) -> Verdict {
    // Events in time order; at equal times calls go first (overlap is the generous reading).
    let mut events: Vec<(Duration, u8, Event)> = Vec::with_capacity(history.len() * 2);
    for (id, operation) in history.iter().enumerate() {
        events.push((operation.invoked, 0, Event::Call(id)));
        if let Some(returned) = operation.returned {
            events.push((returned, 1, Event::Return(id)));
        }
    }
    events.sort_by_key(|(time, order, _)| (*time, *order));
    let events: Vec<Event> = events.into_iter().map(|(_, _, event)| event).collect();

    // A doubly linked list over the events, so operations can be lifted out and put back.
    let count = events.len();
    let mut next: Vec<usize> = (1..=count).collect();
    let mut previous: Vec<usize> = (0..count).map(|i| i.wrapping_sub(1)).collect();
    let head = count; // sentinel index
    next.push(0);
    previous.push(usize::MAX);
    if count == 0 {
        return Verdict::Linearizable;
    }
    previous[0] = head;
    let mut call_of = vec![usize::MAX; history.len()];
    let mut return_of = vec![usize::MAX; history.len()];
    for (index, event) in events.iter().enumerate() {
        match *event {
            Event::Call(id) => call_of[id] = index,
            Event::Return(id) => return_of[id] = index,
        }
    }
    let unlink = |next: &mut Vec<usize>, previous: &mut Vec<usize>, index: usize| {
        let (p, n) = (previous[index], next[index]);
        next[p] = n;
        if n < count {
            previous[n] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, previous: &mut Vec<usize>, index: usize| {
        let (p, n) = (previous[index], next[index]);
        next[p] = index;
        if n < count {
            previous[n] = index;
        }
    };

    let words = history.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, u32)> = HashSet::new();
    let mut stack: Vec<(usize, u32)> = Vec::new(); // (operation, state before it)
    let mut state = initial;
    let mut cursor = next[head];
    let mut longest = 0;
    let mut visited = 0usize;
    let required: usize = history.iter().filter(|op| op.returned.is_some()).count();
    let mut required_done = 0usize;

    loop {
        if required_done == required {
            // Only unknown-outcome operations remain; each may simply never have happened.
            return Verdict::Linearizable;
        }
        let call = match events.get(cursor) {
            Some(Event::Call(id)) if cursor < count => Some(*id),
            // An operation returned before it could be placed, or the list ran out with
            // required operations left: undo the last choice and try the next one.
            _ => None,
        };
        let Some(id) = call else {
            let Some((id, before)) = stack.pop() else {
                return Verdict::NotLinearizable { longest };
            };
            if history[id].returned.is_some() {
                required_done -= 1;
            }
            state = before;
            linearized[id / 64] &= !(1 << (id % 64));
            relink(&mut next, &mut previous, call_of[id]);
            if return_of[id] != usize::MAX {
                relink(&mut next, &mut previous, return_of[id]);
            }
            cursor = next[call_of[id]];
            continue;
        };
        let (allowed, after) = match history[id].op {
            Op::Write(value) => (true, value),
            Op::Read(value) => (value == state, state),
        };
        let mut candidate = linearized.clone();
        candidate[id / 64] |= 1 << (id % 64);
        if !allowed || !seen.insert((candidate.clone(), after)) {
            cursor = next[cursor];
            continue;
        }
        visited += 1;
        if visited > states_max {
            return Verdict::Undecided { limit: states_max };
        }
        stack.push((id, state));
        longest = longest.max(stack.len());
        if history[id].returned.is_some() {
            required_done += 1;
        }
        state = after;
        linearized = candidate;
        unlink(&mut next, &mut previous, call_of[id]);
        if return_of[id] != usize::MAX {
            unlink(&mut next, &mut previous, return_of[id]);
        }
        cursor = next[head];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn op(op: Op, invoked: u64, returned: Option<u64>) -> Operation {
        Operation {
            op,
            invoked: ms(invoked),
            returned: returned.map(ms),
        }
    }

    const LIMIT: usize = 1_000_000;

    #[test]
    fn sequential_reads_of_the_latest_write_are_linearizable() {
        let history = [
            op(Op::Write(1), 0, Some(10)),
            op(Op::Read(1), 20, Some(30)),
            op(Op::Write(2), 40, Some(50)),
            op(Op::Read(2), 60, Some(70)),
        ];
        assert_eq!(check(&history, 0, LIMIT), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let history = [
            op(Op::Write(1), 0, Some(10)),
            op(Op::Write(2), 20, Some(30)),
            op(Op::Read(1), 40, Some(50)),
        ];
        assert!(matches!(
            check(&history, 0, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn overlapping_operations_may_take_effect_in_either_order() {
        let history = [
            op(Op::Write(1), 0, Some(100)),
            op(Op::Read(0), 10, Some(20)),
            op(Op::Read(1), 30, Some(40)),
            op(Op::Write(2), 50, Some(60)),
            op(Op::Read(2), 70, Some(80)),
        ];
        assert_eq!(check(&history, 0, LIMIT), Verdict::Linearizable);
    }

    #[test]
    fn a_read_may_not_flip_back_to_an_older_value() {
        let history = [
            op(Op::Write(1), 0, Some(100)),
            op(Op::Read(1), 10, Some(20)),
            op(Op::Read(0), 30, Some(40)),
        ];
        assert!(matches!(
            check(&history, 0, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn an_unknown_write_may_have_happened_or_not() {
        let happened = [
            op(Op::Write(1), 0, Some(10)),
            op(Op::Write(2), 20, None),
            op(Op::Read(2), 100, Some(110)),
        ];
        assert_eq!(check(&happened, 0, LIMIT), Verdict::Linearizable);
        let did_not = [
            op(Op::Write(1), 0, Some(10)),
            op(Op::Write(2), 20, None),
            op(Op::Read(1), 100, Some(110)),
        ];
        assert_eq!(check(&did_not, 0, LIMIT), Verdict::Linearizable);
        // But it cannot take effect before it was invoked.
        let too_early = [op(Op::Read(2), 0, Some(10)), op(Op::Write(2), 20, None)];
        assert!(matches!(
            check(&too_early, 0, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught() {
        let history = [op(Op::Write(1), 0, Some(10)), op(Op::Read(3), 20, Some(30))];
        assert!(matches!(
            check(&history, 0, LIMIT),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn many_concurrent_clients_check_quickly() {
        // Three clients, each writing its own value then reading it back, interleaved.
        let mut history = Vec::new();
        for round in 0..100u64 {
            let base = round * 100;
            for client in 0..3u64 {
                let value = (client + 1) as u32;
                history.push(op(
                    Op::Write(value),
                    base + client,
                    Some(base + 10 + client),
                ));
            }
            history.push(op(Op::Read(3), base + 50, Some(base + 60)));
        }
        assert_eq!(check(&history, 0, LIMIT), Verdict::Linearizable);
    }
}
