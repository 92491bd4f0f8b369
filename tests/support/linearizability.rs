//! Linearizability checker for concurrent histories of one bank account.
//!
//! A history is a set of completed [`Call`]s, each with the real-time interval
//! `[invoke, complete]` in which a client saw it run. The history is
//! *linearizable* if the calls can be put in one sequential order that
//! (a) respects real time — if `a.complete < b.invoke` then `a` comes before
//! `b` — and (b) is legal for the sequential specification of the account:
//!
//! * `Deposit(amount)` returns `Success` and adds `amount` to the balance;
//! * `Withdraw(amount)` returns `Success` and subtracts `amount` if
//!   `amount <= balance`, otherwise returns `Fail` and changes nothing;
//! * `Query` returns `Balance(balance)`.
//!
//! # Algorithm
//!
//! This is the Wing & Gong search with Lowe's memoisation, as used by Knossos
//! ("WGL"), Porcupine and Horn & Kroening (2015). The invocation and
//! completion events of all calls are kept in one doubly-linked list sorted by
//! time. A call is a *candidate* to be linearized next if its invocation
//! comes before the first completion event still in the list, i.e. it was
//! invoked before the earliest completion among the calls not yet
//! linearized (any other choice would put it after a call that finished
//! before it started). A depth-first search repeatedly takes a candidate,
//! applies it to the sequential model, and — if the model's return value is
//! the recorded one — removes ("lifts") the call's two events from the list
//! and continues; otherwise it tries the next candidate. When no candidate
//! fits it backtracks, re-inserting the most recently lifted call's events
//! (dancing-links style) and trying the candidates after it. The search is
//! iterative with an explicit stack, so histories of many thousands of calls
//! do not overflow the thread's stack.
//!
//! ## Why memoisation matters
//!
//! Without it the search is exponential: `k` overlapping deposits can be
//! ordered in `k!` ways, and when a later call cannot be placed the search
//! would retry every one of those orders (and every order of every earlier
//! window) before concluding anything. But what the rest of the search can do
//! depends only on *which* calls have been linearized and on the resulting
//! balance, not on the order that got there. So every `(set of linearized
//! calls, balance)` state reached is recorded and never expanded twice, which
//! turns `k!` orders into at most `2^k` subsets — and in practice far fewer,
//! since real-time order and the recorded results rule most subsets out.
//!
//! The set of linearized calls is always "every call before some index `p`,
//! plus some calls overlapping call `p`", so a state is stored as the
//! balance plus the bits of that window (usually 128 bits inline), in a hash
//! table per `p`. This keeps hashing and memory proportional to the
//! concurrency rather than to the history length, and keeps the table being
//! probed small enough to stay in cache.
//!
//! ## Neutral calls
//!
//! One further reduction is exact: if a candidate returns what was recorded
//! and leaves the balance unchanged (a `Query` that matches the current
//! balance, a `Withdraw` that rightly fails), it can be linearized right away
//! without trying alternatives. Moving such a call to the front of any valid
//! order of the remaining calls changes no return value and breaks no
//! real-time constraint (it was invoked before every remaining call
//! completed).
//!
//! ## Cost
//!
//! Measured on 2,000-call histories from 16 simulated clients, each call
//! taking effect at a uniformly random point of its interval (one core of a
//! small VM):
//!
//! * each call overlapping ~8 others: 1–2 ms to accept in a release build
//!   (10–60 ms debug); 3–12 ms to reject a corrupted read (30–90 ms debug);
//! * all 16 clients always busy, each call overlapping ~28 others:
//!   0.1–0.5 s to accept (1–4 s debug).
//!
//! Rejecting is the expensive direction: the search must rule out every
//! linearization of everything before the violation. With all 16 clients
//! always busy and the violation at the very end of 2,000 calls, that is
//! 5–8 million states: about 2.5 s and 400 MB in a release build. Each state
//! costs about 50–60 bytes, so `max_states` of a few million bounds both time
//! and memory (the search then reports [`Verdict::GaveUp`]).
//!
//! # Conventions and limitations
//!
//! * Only completed calls are checked: the tests record a call once its
//!   response arrives, so every [`Call`] has a completion time. A call that
//!   never completed (e.g. timed out) may or may not have taken effect and
//!   must not be passed in; leaving it out is only sound if it had no effect
//!   (for example, a `Query`).
//! * Timestamps must come from one monotonic clock shared by all clients, with
//!   `invoke < complete` for each call ([`check`] panics otherwise). Two calls
//!   where one completes at exactly the instant the other is invoked are
//!   treated as concurrent (the permissive reading).
//! * A `Deposit` that would overflow `u64` has no legal outcome in the model.
//! * The unit tests below are compiled into every test binary that includes
//!   this file as a module and run there too: about 0.3 s in a release
//!   build, 2–3 s in a debug build.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// An operation on the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Add the amount (expected to be positive) to the balance.
    Deposit(u64),
    /// Subtract the amount if the balance covers it.
    Withdraw(u64),
    /// Read the balance.
    Query,
}

/// A random operation for a test workload, with its wire name and amount: 30 % deposits of
/// 1..=40, 40 % withdrawals of 1..=60 (many fail when the balance is around 100), 30 % queries.
pub fn random_op(rng: &mut impl rand::Rng) -> (Op, &'static str, u64) {
    match rng.random_range(0..10) {
        0..=2 => {
            let a = rng.random_range(1..=40u64);
            (Op::Deposit(a), "deposit", a)
        }
        3..=6 => {
            let a = rng.random_range(1..=60u64);
            (Op::Withdraw(a), "withdraw", a)
        }
        _ => (Op::Query, "query", 0),
    }
}

/// The result a client observed for an [`Op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A deposit, or a withdrawal that the balance covered.
    Success,
    /// A withdrawal larger than the balance.
    Fail,
    /// The balance returned by a query.
    Balance(u64),
}

/// One completed call in a concurrent history.
#[derive(Debug, Clone)]
pub struct Call {
    /// The client that issued the call (only used in diagnostics).
    pub client: usize,
    /// What the client asked for.
    pub op: Op,
    /// What the client was told.
    pub ret: Ret,
    /// When the client sent the request, in ns on a clock shared by all clients.
    pub invoke: u64,
    /// When the client received the response (`invoke < complete`).
    pub complete: u64,
}

/// How much an answered call changed the balance (a successful deposit or withdrawal).
pub fn effect(call: &Call) -> i64 {
    match (call.op, call.ret) {
        (Op::Deposit(a), Ret::Success) => a as i64,
        (Op::Withdraw(a), Ret::Success) => -(a as i64),
        _ => 0,
    }
}

/// The outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The history is linearizable; `order` lists indices into the history
    /// in a valid linearization order.
    Linearizable { order: Vec<usize> },
    /// No valid linearization exists; `reason` describes the longest
    /// linearizable prefix found and the calls that could not follow it.
    NotLinearizable { reason: String },
    /// The search visited `explored` states (the `max_states` budget) without
    /// reaching a conclusion.
    GaveUp { explored: u64 },
}

impl Verdict {
    /// Whether the history was shown to be linearizable.
    #[must_use]
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable { .. })
    }
}

/// The sequential specification: what `op` returns on an account holding
/// `balance`, and the balance afterwards. `None` if a deposit would overflow.
#[must_use]
pub fn apply(balance: u64, op: Op) -> Option<(Ret, u64)> {
    match op {
        Op::Deposit(amount) => balance.checked_add(amount).map(|b| (Ret::Success, b)),
        Op::Withdraw(amount) if amount <= balance => Some((Ret::Success, balance - amount)),
        Op::Withdraw(_) => Some((Ret::Fail, balance)),
        Op::Query => Some((Ret::Balance(balance), balance)),
    }
}

/// The balance after linearizing `call` at `balance`, if the model returns
/// what was recorded.
fn step(balance: u64, call: &Call) -> Option<u64> {
    apply(balance, call.op)
        .filter(|&(ret, _)| ret == call.ret)
        .map(|(_, after)| after)
}

/// Checks whether `history`, run against an account that started with
/// `initial_balance`, is linearizable, exploring at most `max_states`
/// distinct search states.
///
/// The order of `history` does not matter. On `Linearizable`, `order` holds
/// indices into `history`. Each state costs about 50–60 bytes of memory and
/// well under a microsecond in a release build; see the module documentation
/// for typical numbers.
///
/// # Panics
///
/// If some call has `invoke >= complete` (a bug in the recording harness).
#[must_use]
pub fn check(initial_balance: u64, history: &[Call], max_states: u64) -> Verdict {
    for (i, call) in history.iter().enumerate() {
        assert!(
            call.invoke < call.complete,
            "malformed history: call {} does not have invoke < complete",
            describe(i, call)
        );
    }
    assert!(history.len() < (u32::MAX / 2 - 2) as usize, "history too long");
    Search::new(initial_balance, history).run(max_states)
}

/// The search over one history of `n` calls.
struct Search<'h> {
    history: &'h [Call],
    initial_balance: u64,
    /// Calls renumbered by invocation time: `calls[id]` is an index into `history`.
    calls: Vec<usize>,
    /// `window_end[id]`: the number of calls (in id order) invoked no later
    /// than call `id` completes. While `id` is the first unlinearized call,
    /// only calls below this bound can have been linearized.
    window_end: Vec<usize>,
    /// The event list, doubly linked through `next` and `prev` between the
    /// sentinels `head = 2n` and `tail = 2n + 1`. Event `id < n` is the
    /// invocation of call `id`, event `n + id` its completion.
    next: Vec<u32>,
    prev: Vec<u32>,
    head: u32,
    tail: u32,
}

/// One level of the depth-first search: the call linearized at that depth and
/// the balance before it.
#[derive(Clone, Copy)]
struct Frame {
    id: u32,
    balance_before: u64,
    /// The call was a neutral candidate, the only one tried at its node.
    forced: bool,
}

/// Where the search goes next at the current node.
#[derive(Clone, Copy)]
enum Next {
    /// The node was just entered: try its neutral candidate, or else its
    /// first candidate.
    Fresh,
    /// Try the candidate after this call's invocation in the event list.
    After(u32),
    /// Every candidate worth trying has been tried: backtrack.
    Exhausted,
}

/// A memoised search state, in the memo table for its `first_open` (the
/// lowest-numbered call not yet linearized): the balance and the set of
/// linearized calls at or after `first_open`.
///
/// While `first_open` is pending, only calls invoked no later than it
/// completes can have been linearized (see `Search::window_end`), so only
/// that window is stored. Grouping states by `first_open` also keeps the
/// table being probed small and cache-resident, as the search mostly moves
/// within one window at a time.
#[derive(PartialEq, Eq)]
struct StateKey {
    balance: u64,
    window: Window,
}

#[derive(PartialEq, Eq)]
enum Window {
    /// Bit `k` is call `first_open + k`, for windows of up to 128 calls (the
    /// common case, stored without allocating).
    Small([u64; 2]),
    /// The bitset words from the one holding `first_open` to the one holding
    /// the end of its window. Bits below `first_open` are all set.
    Large(Box<[u64]>),
}

impl Hash for StateKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.balance);
        let words = match &self.window {
            Window::Small(words) => &words[..],
            Window::Large(words) => &words[..],
        };
        for &word in words {
            state.write_u64(word);
        }
    }
}

/// A small, fast, non-cryptographic hasher (Fx-style multiply-rotate with a
/// final avalanche so that every input bit reaches the bucket-index bits).
#[derive(Default)]
struct StateHasher(u64);

impl StateHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for StateHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let mut rest = [0; 8];
        rest[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.add(u64::from_le_bytes(rest));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn finish(&self) -> u64 {
        // splitmix64 finaliser.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The states already explored, indexed by `first_open`.
type Memo = Vec<HashSet<StateKey, BuildHasherDefault<StateHasher>>>;

impl<'h> Search<'h> {
    fn new(initial_balance: u64, history: &'h [Call]) -> Self {
        let n = history.len();
        let mut calls: Vec<usize> = (0..n).collect();
        calls.sort_by_key(|&i| (history[i].invoke, history[i].complete, i));
        let invokes: Vec<u64> = calls.iter().map(|&i| history[i].invoke).collect();
        let window_end = calls
            .iter()
            .map(|&i| invokes.partition_point(|&t| t <= history[i].complete))
            .collect();

        // Events sorted by time; at equal times invocations come first, so
        // calls that merely touch are concurrent. Invocations of equal time
        // keep id order, matching the call numbering.
        let mut events: Vec<u32> = (0..2 * n as u32).collect();
        let key = |e: u32| {
            let e = e as usize;
            if e < n {
                (history[calls[e]].invoke, 0, e)
            } else {
                (history[calls[e - n]].complete, 1, e - n)
            }
        };
        events.sort_by_key(|&e| key(e));

        let head = 2 * n as u32;
        let tail = head + 1;
        let mut next = vec![tail; 2 * n + 2];
        let mut prev = vec![head; 2 * n + 2];
        let mut last = head;
        for &e in &events {
            next[last as usize] = e;
            prev[e as usize] = last;
            last = e;
        }
        next[last as usize] = tail;
        prev[tail as usize] = last;

        Search {
            history,
            initial_balance,
            calls,
            window_end,
            next,
            prev,
            head,
            tail,
        }
    }

    fn call(&self, id: u32) -> &'h Call {
        &self.history[self.calls[id as usize]]
    }

    /// Removes call `id`'s invocation and completion events from the list.
    fn lift(&mut self, id: u32) {
        let n = self.calls.len() as u32;
        self.unlink(id);
        self.unlink(n + id);
    }

    /// Undoes the most recent [`Self::lift`], which must have been of `id`.
    fn unlift(&mut self, id: u32) {
        let n = self.calls.len() as u32;
        self.relink(n + id);
        self.relink(id);
    }

    fn unlink(&mut self, e: u32) {
        let (p, x) = (self.prev[e as usize], self.next[e as usize]);
        self.next[p as usize] = x;
        self.prev[x as usize] = p;
    }

    fn relink(&mut self, e: u32) {
        let (p, x) = (self.prev[e as usize], self.next[e as usize]);
        self.next[p as usize] = e;
        self.prev[x as usize] = e;
    }

    fn key(&self, linearized: &[u64], first_open: usize, balance: u64) -> StateKey {
        let n = self.calls.len();
        let end = self.window_end.get(first_open).copied().unwrap_or(n);
        let window = if end - first_open <= 128 {
            // The 128 bits from `first_open` on. Bits past the window are
            // clear, so nothing needs masking.
            let word = |w: usize| linearized.get(w).copied().unwrap_or(0);
            let (w, shift) = (first_open / 64, first_open % 64);
            let mut bits = (u128::from(word(w)) | u128::from(word(w + 1)) << 64) >> shift;
            if shift > 0 {
                bits |= u128::from(word(w + 2)) << (128 - shift);
            }
            Window::Small([bits as u64, (bits >> 64) as u64])
        } else {
            Window::Large(linearized[first_open / 64..=(end - 1) / 64].into())
        };
        StateKey { balance, window }
    }

    fn run(mut self, max_states: u64) -> Verdict {
        let n = self.calls.len();
        let mut linearized = vec![0u64; n.div_ceil(64)];
        let mut first_open = 0;
        let mut balance = self.initial_balance;
        let mut stack: Vec<Frame> = Vec::with_capacity(n);
        let mut memo: Memo = (0..=n).map(|_| HashSet::default()).collect();
        let mut explored = 0;
        // The deepest stack seen, and how much of it the current stack shares.
        let mut best: Vec<u32> = Vec::new();
        let mut shared = 0;

        let mut next = Next::Fresh;
        loop {
            if self.next[self.head as usize] == self.tail {
                let order = stack.iter().map(|f| self.calls[f.id as usize]).collect();
                return Verdict::Linearizable { order };
            }
            // Pick the next candidate to try at the current node.
            let (candidate, forced) = match next {
                Next::Fresh => match self.neutral_candidate(balance) {
                    Some(id) => (Some(id), true),
                    None => (self.candidate_from(self.next[self.head as usize]), false),
                },
                Next::After(id) => (self.candidate_from(self.next[id as usize]), false),
                Next::Exhausted => (None, false),
            };
            if let Some(id) = candidate {
                next = if forced {
                    // The node was reduced to its neutral candidate.
                    Next::Exhausted
                } else {
                    Next::After(id)
                };
                let Some(after) = step(balance, self.call(id)) else {
                    continue;
                };
                let i = id as usize;
                linearized[i / 64] |= 1 << (i % 64);
                let saved_first_open = first_open;
                if i == first_open {
                    first_open = first_unset(&linearized, i).min(n);
                }
                if !memo[first_open].insert(self.key(&linearized, first_open, after)) {
                    // Already explored from that state, without success.
                    linearized[i / 64] &= !(1 << (i % 64));
                    first_open = saved_first_open;
                    continue;
                }
                if explored == max_states {
                    return Verdict::GaveUp { explored };
                }
                explored += 1;
                stack.push(Frame {
                    id,
                    balance_before: balance,
                    forced,
                });
                balance = after;
                self.lift(id);
                if stack.len() > best.len() {
                    best.truncate(shared);
                    best.extend(stack[shared..].iter().map(|f| f.id));
                    shared = stack.len();
                }
                next = Next::Fresh;
            } else {
                // Every candidate has been tried at this node: backtrack.
                let Some(frame) = stack.pop() else {
                    return Verdict::NotLinearizable {
                        reason: self.explain(&best),
                    };
                };
                shared = shared.min(stack.len());
                let i = frame.id as usize;
                linearized[i / 64] &= !(1 << (i % 64));
                first_open = first_open.min(i);
                balance = frame.balance_before;
                self.unlift(frame.id);
                next = if frame.forced {
                    Next::Exhausted
                } else {
                    Next::After(frame.id)
                };
            }
        }
    }

    /// The call whose invocation is event `e`, if `e` is a candidate: an
    /// invocation before the first completion event in the list.
    fn candidate_from(&self, e: u32) -> Option<u32> {
        (e < self.calls.len() as u32).then_some(e)
    }

    /// A candidate that returns what was recorded and leaves the balance
    /// unchanged (a matching `Query`, a failed `Withdraw`), if any.
    ///
    /// If the rest of the history can be linearized from here at all, it can
    /// be with such a call first: moving it to the front of any valid order
    /// keeps its return value, changes no other call's, and breaks no
    /// real-time constraint since it was invoked before every remaining call
    /// completed. So the search takes it and tries nothing else at this node.
    fn neutral_candidate(&self, balance: u64) -> Option<u32> {
        let n = self.calls.len() as u32;
        let mut e = self.next[self.head as usize];
        while e < n {
            if step(balance, self.call(e)) == Some(balance) {
                return Some(e);
            }
            e = self.next[e as usize];
        }
        None
    }

    /// Describes why the history is not linearizable, given the deepest
    /// linearizable prefix the search found (as call ids).
    fn explain(&self, best: &[u32]) -> String {
        /// How many calls of the prefix to show.
        const SHOWN: usize = 8;
        let n = self.calls.len();
        let mut balance = self.initial_balance;
        let mut done = vec![false; n];
        for &id in best {
            balance = step(balance, self.call(id)).expect("prefix replays");
            done[id as usize] = true;
        }
        let pending: Vec<u32> = (0..n as u32).filter(|&id| !done[id as usize]).collect();
        let deadline = *pending
            .iter()
            .min_by_key(|&&id| self.call(id).complete)
            .expect("a non-linearizable history has a call left over");
        let deadline_time = self.call(deadline).complete;

        let mut reason = format!(
            "not linearizable (initial balance {}): at most {} of {} calls can be linearized.\n",
            self.initial_balance,
            best.len(),
            n
        );
        if best.is_empty() {
            let _ = writeln!(reason, "No call can even be linearized first (balance {balance}).");
        } else {
            let plural = if best.len() == 1 { "" } else { "s" };
            let _ = write!(reason, "Longest linearizable prefix found: {} call{plural}", best.len());
            if best.len() > SHOWN {
                let _ = write!(reason, " (last {SHOWN} shown)");
            }
            let _ = writeln!(reason, ", after which the balance is {balance}:");
            for &id in &best[best.len().saturating_sub(SHOWN)..] {
                let _ = writeln!(reason, "  {}", self.describe(id));
            }
        }
        let _ = writeln!(
            reason,
            "Call {} must be linearized by {deadline_time} ns, but no call that may come next fits:",
            self.describe(deadline)
        );
        for &id in pending.iter().filter(|&&id| self.call(id).invoke <= deadline_time) {
            let call = self.call(id);
            let verdict = match apply(balance, call.op) {
                Some((ret, _)) if ret == call.ret => {
                    "fits here, but no order of the remaining calls works after it".to_string()
                }
                Some((ret, _)) => format!("the account would return {ret:?}"),
                None => "the deposit would overflow the balance".to_string(),
            };
            let _ = writeln!(reason, "  {}: {verdict}", self.describe(id));
        }
        reason
    }

    fn describe(&self, id: u32) -> String {
        let i = self.calls[id as usize];
        describe(i, &self.history[i])
    }
}

fn describe(index: usize, call: &Call) -> String {
    format!(
        "#{index} (client {}: {:?} -> {:?}, invoked {} ns, completed {} ns)",
        call.client, call.op, call.ret, call.invoke, call.complete
    )
}

/// The index of the first clear bit at or after `from` (may exceed the
/// number of calls if only padding bits are clear).
fn first_unset(bits: &[u64], from: usize) -> usize {
    let mut w = from / 64;
    let mut word = !bits[w] & (!0u64 << (from % 64));
    loop {
        if word != 0 {
            return w * 64 + word.trailing_zeros() as usize;
        }
        w += 1;
        if w == bits.len() {
            return w * 64;
        }
        word = !bits[w];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const BUDGET: u64 = 10_000_000;

    fn c(client: usize, op: Op, ret: Ret, invoke: u64, complete: u64) -> Call {
        Call {
            client,
            op,
            ret,
            invoke,
            complete,
        }
    }

    /// Checks that `order` is a permutation of the history that respects real
    /// time and the sequential specification.
    fn assert_valid_linearization(initial: u64, history: &[Call], order: &[usize]) {
        assert_eq!(order.len(), history.len(), "order must cover every call");
        let mut position = vec![usize::MAX; history.len()];
        for (pos, &i) in order.iter().enumerate() {
            assert_eq!(position[i], usize::MAX, "call #{i} appears twice");
            position[i] = pos;
        }
        for (a, ca) in history.iter().enumerate() {
            for (b, cb) in history.iter().enumerate() {
                if ca.complete < cb.invoke {
                    assert!(position[a] < position[b], "#{a} precedes #{b} in real time");
                }
            }
        }
        let mut balance = initial;
        for &i in order {
            balance = step(balance, &history[i])
                .unwrap_or_else(|| panic!("#{i} {:?} illegal at balance {balance}", history[i]));
        }
    }

    fn expect_linearizable(initial: u64, history: &[Call]) -> Vec<usize> {
        match check(initial, history, BUDGET) {
            Verdict::Linearizable { order } => {
                assert_valid_linearization(initial, history, &order);
                order
            }
            other => panic!("expected linearizable, got {other:?}"),
        }
    }

    fn expect_not_linearizable(initial: u64, history: &[Call]) -> String {
        match check(initial, history, BUDGET) {
            Verdict::NotLinearizable { reason } => reason,
            other => panic!("expected not linearizable, got {other:?}"),
        }
    }

    /// Tiny deterministic PRNG (xorshift64*), so the tests need no crates.
    struct XorShift(u64);

    impl XorShift {
        fn new(seed: u64) -> Self {
            XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform-ish in `lo..=hi`.
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next() % (hi - lo + 1)
        }
    }

    // ----- Hand-written histories -----

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check(7, &[], BUDGET), Verdict::Linearizable { order: vec![] });
    }

    #[test]
    fn sequential_history_passes_in_real_time_order() {
        // Listed out of order on purpose: the order returned is by index.
        let history = [
            c(1, Op::Withdraw(30), Ret::Success, 30, 40),
            c(0, Op::Deposit(50), Ret::Success, 10, 20),
            c(1, Op::Withdraw(100), Ret::Fail, 50, 60),
            c(2, Op::Query, Ret::Balance(20), 70, 80),
        ];
        assert_eq!(expect_linearizable(0, &history), vec![1, 0, 2, 3]);
    }

    #[test]
    fn overlapping_deposit_and_withdraw_with_one_explanation() {
        // The withdrawal of 30 from an empty account only succeeds if the
        // concurrent deposit is linearized first.
        let history = [
            c(0, Op::Withdraw(30), Ret::Success, 0, 100),
            c(1, Op::Deposit(50), Ret::Success, 10, 90),
            c(2, Op::Query, Ret::Balance(20), 120, 130),
        ];
        assert_eq!(expect_linearizable(0, &history), vec![1, 0, 2]);
    }

    #[test]
    fn overlapping_withdrawals_one_fails() {
        // 60 then 70 from 100: the 70 fails. The other order would let 70
        // succeed, so only one linearization exists.
        let history = [
            c(0, Op::Withdraw(70), Ret::Fail, 0, 100),
            c(1, Op::Withdraw(60), Ret::Success, 5, 95),
            c(2, Op::Query, Ret::Balance(40), 200, 210),
        ];
        assert_eq!(expect_linearizable(100, &history), vec![1, 0, 2]);
    }

    #[test]
    fn concurrent_query_may_see_either_side_of_a_deposit() {
        for seen in [10, 15] {
            let history = [
                c(0, Op::Deposit(5), Ret::Success, 0, 100),
                c(1, Op::Query, Ret::Balance(seen), 10, 20),
            ];
            expect_linearizable(10, &history);
        }
    }

    #[test]
    fn touching_intervals_count_as_concurrent() {
        // The query is invoked at the very instant the deposit completes, so
        // it may still be ordered before it.
        let history = [
            c(0, Op::Deposit(5), Ret::Success, 0, 10),
            c(1, Op::Query, Ret::Balance(0), 10, 20),
        ];
        assert_eq!(expect_linearizable(0, &history), vec![1, 0]);
    }

    #[test]
    fn double_spend_is_rejected() {
        // The original system's bug: two overlapping withdrawals of 60 and 70
        // from 100 both succeed.
        let history = [
            c(0, Op::Withdraw(60), Ret::Success, 0, 100),
            c(1, Op::Withdraw(70), Ret::Success, 10, 90),
        ];
        let reason = expect_not_linearizable(100, &history);
        assert!(reason.contains("at most 1 of 2"), "{reason}");
        assert!(reason.contains("would return Fail"), "{reason}");
    }

    #[test]
    fn impossible_query_value_is_rejected() {
        let history = [
            c(0, Op::Deposit(10), Ret::Success, 0, 10),
            c(0, Op::Deposit(20), Ret::Success, 20, 30),
            c(1, Op::Query, Ret::Balance(31), 40, 50),
        ];
        let reason = expect_not_linearizable(0, &history);
        assert!(reason.contains("at most 2 of 3"), "{reason}");
        assert!(reason.contains("#2 (client 1: Query -> Balance(31)"), "{reason}");
        assert!(reason.contains("would return Balance(30)"), "{reason}");
    }

    #[test]
    fn stale_read_is_rejected() {
        // The query starts after the deposit completed but sees the old balance.
        let history = [
            c(0, Op::Deposit(25), Ret::Success, 0, 10),
            c(1, Op::Query, Ret::Balance(100), 11, 20),
        ];
        let reason = expect_not_linearizable(100, &history);
        assert!(reason.contains("the balance is 125:"), "{reason}");
    }

    #[test]
    fn stale_failed_withdrawal_is_rejected() {
        // The withdrawal starts after deposits that cover it have completed,
        // yet it fails.
        let history = [
            c(0, Op::Deposit(40), Ret::Success, 0, 10),
            c(1, Op::Deposit(40), Ret::Success, 5, 15),
            c(2, Op::Withdraw(70), Ret::Fail, 20, 30),
        ];
        let reason = expect_not_linearizable(0, &history);
        assert!(reason.contains("would return Success"), "{reason}");
    }

    #[test]
    fn gives_up_when_budget_is_exhausted() {
        let history: Vec<Call> = (0..100)
            .map(|k| c(0, Op::Deposit(1), Ret::Success, 10 * k, 10 * k + 5))
            .collect();
        assert_eq!(check(0, &history, 10), Verdict::GaveUp { explored: 10 });
        // The same history fits exactly in a budget of one state per call.
        expect_linearizable(0, &history);
        assert!(check(0, &history, 100).is_linearizable());
    }

    #[test]
    #[should_panic(expected = "malformed history")]
    fn malformed_interval_panics() {
        let _ = check(0, &[c(0, Op::Query, Ret::Balance(0), 5, 5)], BUDGET);
    }

    // ----- Randomised small histories against a brute-force oracle -----

    /// Decides linearizability straight from the definition, by enumerating
    /// permutations (pruned at the first call that breaks real-time order or
    /// the specification). Only for tiny histories.
    fn brute_force(initial: u64, history: &[Call]) -> bool {
        /// Tries every remaining call at position `k`, after `order[..k]`
        /// left the balance at `balance`.
        fn extend(history: &[Call], order: &mut [usize], k: usize, balance: u64) -> bool {
            if k == order.len() {
                return true;
            }
            for j in k..order.len() {
                order.swap(k, j);
                let call = &history[order[k]];
                let nothing_later_finished_first = order[k + 1..]
                    .iter()
                    .all(|&later| history[later].complete >= call.invoke);
                if nothing_later_finished_first
                    && let Some(after) = step(balance, call)
                    && extend(history, order, k + 1, after)
                {
                    return true;
                }
                order.swap(k, j);
            }
            false
        }
        let mut order: Vec<usize> = (0..history.len()).collect();
        extend(history, &mut order, 0, initial)
    }

    /// A correct execution: each call takes effect at a point chosen
    /// uniformly inside its interval, with results computed in the order of
    /// those points. Each client issues its calls one after another.
    fn simulate(
        rng: &mut XorShift,
        initial: u64,
        clients: usize,
        calls_per_client: usize,
        (min_duration, max_duration): (u64, u64),
        max_gap: u64,
    ) -> Vec<Call> {
        let mut history = Vec::with_capacity(clients * calls_per_client);
        let mut points = Vec::with_capacity(clients * calls_per_client);
        for client in 0..clients {
            let mut t = rng.range(0, max_gap);
            for _ in 0..calls_per_client {
                let invoke = t + rng.range(0, max_gap);
                let complete = invoke + rng.range(min_duration.max(2), max_duration.max(2));
                points.push(rng.range(invoke + 1, complete - 1));
                let op = match rng.range(0, 99) {
                    0..40 => Op::Deposit(rng.range(1, 100)),
                    40..75 => Op::Withdraw(rng.range(1, 150)),
                    _ => Op::Query,
                };
                history.push(c(client, op, Ret::Fail, invoke, complete));
                t = complete;
            }
        }
        let mut by_point: Vec<usize> = (0..history.len()).collect();
        by_point.sort_by_key(|&i| (points[i], i));
        let mut balance = initial;
        for i in by_point {
            let (ret, after) = apply(balance, history[i].op).expect("no overflow");
            history[i].ret = ret;
            balance = after;
        }
        history
    }

    #[test]
    fn small_random_histories_agree_with_brute_force() {
        let mut rng = XorShift::new(0x5eed);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3_000 {
            let initial = rng.range(0, 3) * 20;
            let clients = rng.range(1, 4) as usize;
            let per_client = rng.range(1, 3) as usize;
            let mut history = simulate(&mut rng, initial, clients, per_client, (2, 12), 6);
            if rng.range(0, 1) == 0 {
                let i = rng.range(0, history.len() as u64 - 1) as usize;
                history[i].ret = match history[i].ret {
                    Ret::Balance(b) => Ret::Balance(b ^ rng.range(1, 31)),
                    Ret::Success if matches!(history[i].op, Op::Withdraw(_)) => Ret::Fail,
                    Ret::Fail => Ret::Success,
                    same => same,
                };
            }
            let expected = brute_force(initial, &history);
            match check(initial, &history, BUDGET) {
                Verdict::Linearizable { order } => {
                    assert!(expected, "checker accepted {history:#?}");
                    assert_valid_linearization(initial, &history, &order);
                    yes += 1;
                }
                Verdict::NotLinearizable { .. } => {
                    assert!(!expected, "checker rejected {history:#?}");
                    no += 1;
                }
                Verdict::GaveUp { .. } => panic!("gave up on {history:#?}"),
            }
        }
        assert!(yes > 500 && no > 500, "poor coverage: {yes} yes, {no} no");
    }

    // ----- Large generated histories -----

    /// 16 clients × 125 calls; each call overlaps a few others on average.
    fn large_history(seed: u64) -> Vec<Call> {
        simulate(&mut XorShift::new(seed), 1_000, 16, 125, (2, 100_000), 250_000)
    }

    /// Average number of other calls each call overlaps.
    fn mean_overlap(history: &[Call]) -> f64 {
        let mut sorted = history.to_vec();
        sorted.sort_by_key(|c| c.invoke);
        let mut total = 0usize;
        for (i, a) in sorted.iter().enumerate() {
            total += sorted[i + 1..].iter().take_while(|b| b.invoke <= a.complete).count();
        }
        2.0 * total as f64 / history.len() as f64
    }

    fn timed_check(initial: u64, history: &[Call]) -> Verdict {
        let start = Instant::now();
        let verdict = check(initial, history, BUDGET);
        let outcome = match &verdict {
            Verdict::Linearizable { .. } => "linearizable",
            Verdict::NotLinearizable { .. } => "not linearizable",
            Verdict::GaveUp { .. } => "gave up",
        };
        println!(
            "checked {} calls (mean overlap {:.1}) in {:?}: {outcome}",
            history.len(),
            mean_overlap(history),
            start.elapsed()
        );
        verdict
    }

    #[test]
    fn generated_correct_history_passes() {
        for seed in 1..=3 {
            let history = large_history(seed);
            assert_eq!(history.len(), 2_000);
            match timed_check(1_000, &history) {
                Verdict::Linearizable { order } => assert_valid_linearization(1_000, &history, &order),
                other => panic!("seed {seed}: {other:?}"),
            }
        }
    }

    #[test]
    fn generated_history_with_corrupted_isolated_query_fails() {
        for seed in 1..=3 {
            let mut history = large_history(seed);
            let overlaps_a_write = |q: &Call| {
                history
                    .iter()
                    .any(|w| !matches!(w.op, Op::Query) && w.invoke <= q.complete && q.invoke <= w.complete)
            };
            // The latest isolated query: the search must rule out every
            // linearization of everything before it.
            let victim = (0..history.len())
                .filter(|&i| matches!(history[i].op, Op::Query) && !overlaps_a_write(&history[i]))
                .max_by_key(|&i| history[i].invoke)
                .expect("the generated history has an isolated query");
            let Ret::Balance(b) = history[victim].ret else {
                unreachable!()
            };
            history[victim].ret = Ret::Balance(b + 1);
            let Verdict::NotLinearizable { reason } = timed_check(1_000, &history) else {
                panic!("seed {seed}: corrupted query #{victim} was not detected");
            };
            assert!(reason.contains(&format!("#{victim} ")), "seed {seed}: {reason}");
        }
    }

    /// All 16 clients nearly always busy, so every call overlaps ~28 others
    /// and there is no quiescent point.
    fn contended_history(seed: u64, calls_per_client: usize) -> Vec<Call> {
        simulate(&mut XorShift::new(seed), 500, 16, calls_per_client, (2, 100_000), 2_000)
    }

    #[test]
    fn generated_high_contention_history_passes() {
        let history = contended_history(99, 125);
        match timed_check(500, &history) {
            Verdict::Linearizable { order } => assert_valid_linearization(500, &history, &order),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generated_high_contention_violation_is_found() {
        // The worst case for the search: the violation is a final query, so
        // every way of linearizing everything before it must be ruled out.
        let mut history = contended_history(3, 6);
        let Verdict::Linearizable { order } = check(500, &history, BUDGET) else {
            panic!("the simulated history is linearizable");
        };
        let last = order.iter().fold(500, |b, &i| step(b, &history[i]).unwrap());
        let end = history.iter().map(|c| c.complete).max().unwrap();
        history.push(c(16, Op::Query, Ret::Balance(last + 1), end + 1, end + 2));
        let Verdict::NotLinearizable { reason } = timed_check(500, &history) else {
            panic!("impossible final balance not detected");
        };
        assert!(reason.contains(&format!("would return Balance({last})")), "{reason}");
    }
}
