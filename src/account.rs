//! The replicated state machine itself: one account balance plus the table of recorded
//! results by event id. Pure: no I/O, no clocks, no randomness, so every replica that applies
//! the same log reaches the same state and answers the same results.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The largest balance the system accepts. The original wire API (`seed-banks.proto`) carries
/// balances as `int32`, so anything above would be unrepresentable to its clients.
pub const MAX_BALANCE: u64 = i32::MAX as u64;

/// What a customer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    Deposit(u64),
    Withdraw(u64),
    Query,
}

impl Operation {
    /// The course format's `interface` name.
    pub fn interface(&self) -> &'static str {
        match self {
            Operation::Deposit(_) => "deposit",
            Operation::Withdraw(_) => "withdraw",
            Operation::Query => "query",
        }
    }
}

/// One replicated log entry. The kinds are named after the original implementation's
/// interfaces (`Propagate_Deposit`, `Propagate_Withdraw`): applying the entry on a branch is
/// exactly what "propagating" meant there, except that every branch applies it in the same
/// order. Queries are reads, never log entries; only the answer a branch gave to a query with
/// an event id is recorded afterwards (`RecordQuery`), so that a branch restarted from its
/// data directory, or any other branch, answers a re-run of that query the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    PropagateDeposit {
        event_id: Option<u64>,
        amount: u64,
    },
    PropagateWithdraw {
        event_id: Option<u64>,
        amount: u64,
    },
    /// Records `balance` as the answer to the query `event_id` unless that id already has a
    /// result (the first recorded answer wins); the balance does not change. Added after the
    /// two above, so logs written before it still decode.
    RecordQuery {
        event_id: u64,
        balance: u64,
    },
}

impl Command {
    /// The log entry for a customer's operation, or `None` for a query (a read).
    pub fn for_request(event_id: Option<u64>, operation: Operation) -> Option<Command> {
        match operation {
            Operation::Deposit(amount) => Some(Command::PropagateDeposit { event_id, amount }),
            Operation::Withdraw(amount) => Some(Command::PropagateWithdraw { event_id, amount }),
            Operation::Query => None,
        }
    }

    pub fn event_id(&self) -> Option<u64> {
        match *self {
            Command::PropagateDeposit { event_id, .. } | Command::PropagateWithdraw { event_id, .. } => event_id,
            Command::RecordQuery { event_id, .. } => Some(event_id),
        }
    }

    pub fn operation(&self) -> Operation {
        match *self {
            Command::PropagateDeposit { amount, .. } => Operation::Deposit(amount),
            Command::PropagateWithdraw { amount, .. } => Operation::Withdraw(amount),
            Command::RecordQuery { .. } => Operation::Query,
        }
    }
}

/// The result of one operation, as the customer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Success,
    /// Withdrawal larger than the balance, or a deposit beyond [`MAX_BALANCE`]: nothing changed.
    Fail,
    Balance(u64),
    /// The event id was recorded earlier for a different operation; nothing changed.
    EventIdReused {
        recorded: Operation,
    },
}

/// What `apply` returns for one entry: the outcome and the balance right after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    pub balance: u64,
}

/// A result recorded under an event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    operation: Operation,
    outcome: Outcome,
}

/// How many event ids the idempotency table remembers: the most recent ones, in apply order.
/// A retry is recognized as long as fewer than this many newer event ids were recorded since
/// its first attempt (at the cluster's measured peak of ~15k writes/s that is over 10 s; at the
/// course's rates, days). The bound keeps a branch's memory flat under endless load (~14 MB
/// for a full table). It is part of the state machine's definition, not a setting: replicas
/// with different windows would disagree on which retries are duplicates.
pub const IDEMPOTENCY_WINDOW: usize = 200_000;

/// A table by event id that keeps only the most recent `capacity` ids, in insertion order.
/// Deterministic: the same inserts in the same order leave the same table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentTable<V> {
    map: HashMap<u64, V>,
    /// Ids oldest first: the eviction order.
    order: VecDeque<u64>,
    capacity: usize,
}

impl<V> Default for RecentTable<V> {
    fn default() -> Self {
        RecentTable::new(IDEMPOTENCY_WINDOW)
    }
}

impl<V> RecentTable<V> {
    pub fn new(capacity: usize) -> RecentTable<V> {
        RecentTable {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, id: u64) -> Option<&V> {
        self.map.get(&id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value under `id`: the one already there, else `value` (inserted, evicting the oldest
    /// id when the table is full).
    pub fn get_or_insert(&mut self, id: u64, value: V) -> &V {
        if !self.map.contains_key(&id) {
            self.order.push_back(id);
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.map.remove(&oldest);
                }
            }
        }
        self.map.entry(id).or_insert(value)
    }
}

/// The account: balance and idempotency table. Serialized whole into snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Account {
    balance: u64,
    recorded: RecentTable<Recorded>,
}

impl Account {
    pub fn new(initial_balance: u64) -> Account {
        Account::with_window(initial_balance, IDEMPOTENCY_WINDOW)
    }

    /// An account whose idempotency table keeps the last `window` event ids (tests use small ones).
    pub fn with_window(initial_balance: u64, window: usize) -> Account {
        Account {
            balance: initial_balance,
            recorded: RecentTable::new(window),
        }
    }

    pub fn balance(&self) -> u64 {
        self.balance
    }

    /// How many event ids have a recorded result (the idempotency table's size).
    pub fn recorded_events(&self) -> usize {
        self.recorded.len()
    }

    /// The operation recorded under `event_id`, if any.
    pub fn recorded_operation(&self, event_id: u64) -> Option<Operation> {
        self.recorded.get(event_id).map(|recorded| recorded.operation)
    }

    /// The answer recorded for the query `event_id` ([`Command::RecordQuery`]), if any.
    pub fn recorded_query(&self, event_id: u64) -> Option<u64> {
        match self.recorded.get(event_id)?.outcome {
            Outcome::Balance(balance) => Some(balance),
            _ => None,
        }
    }

    /// Applies one command. A command whose event id is already recorded changes nothing and
    /// answers the recorded result (or `EventIdReused` when the id was used for something else).
    pub fn apply(&mut self, command: &Command) -> Applied {
        let operation = command.operation();
        if let Some(id) = command.event_id()
            && let Some(recorded) = self.recorded.get(id)
        {
            let outcome = if recorded.operation == operation {
                recorded.outcome
            } else {
                Outcome::EventIdReused {
                    recorded: recorded.operation,
                }
            };
            return self.applied(outcome);
        }
        let outcome = match *command {
            Command::RecordQuery { balance, .. } => Outcome::Balance(balance),
            _ => self.execute(operation),
        };
        if let Some(id) = command.event_id() {
            self.recorded.get_or_insert(id, Recorded { operation, outcome });
        }
        self.applied(outcome)
    }

    /// Reads without changing anything (the linearizable-read path for anonymous queries).
    pub fn query(&self) -> Outcome {
        Outcome::Balance(self.balance)
    }

    fn execute(&mut self, operation: Operation) -> Outcome {
        match operation {
            Operation::Deposit(amount) => match self.balance.checked_add(amount) {
                Some(sum) if sum <= MAX_BALANCE => {
                    self.balance = sum;
                    Outcome::Success
                }
                _ => Outcome::Fail,
            },
            Operation::Withdraw(amount) => match self.balance.checked_sub(amount) {
                Some(rest) => {
                    self.balance = rest;
                    Outcome::Success
                }
                None => Outcome::Fail,
            },
            Operation::Query => Outcome::Balance(self.balance),
        }
    }

    fn applied(&self, outcome: Outcome) -> Applied {
        Applied {
            outcome,
            balance: self.balance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deposit(id: u64, amount: u64) -> Command {
        Command::PropagateDeposit {
            event_id: Some(id),
            amount,
        }
    }
    fn withdraw(id: u64, amount: u64) -> Command {
        Command::PropagateWithdraw {
            event_id: Some(id),
            amount,
        }
    }

    #[test]
    fn the_idempotency_table_keeps_the_most_recent_window_of_event_ids() {
        let mut account = Account::with_window(0, 3);
        for id in 1..=5 {
            account.apply(&deposit(id, 1));
        }
        assert_eq!(account.recorded_events(), 3);
        assert_eq!(account.balance(), 5);
        // Ids 3..=5 are still recognized: a retry changes nothing.
        assert_eq!(account.apply(&deposit(5, 1)).balance, 5);
        assert_eq!(account.recorded_operation(3), Some(Operation::Deposit(1)));
        // Ids 1 and 2 fell out of the window (oldest first).
        assert_eq!(account.recorded_operation(1), None);
        assert_eq!(account.recorded_operation(2), None);
        // A replica rebuilt from a snapshot evicts in the same order.
        let mut copy = account.clone();
        account.apply(&deposit(6, 1));
        copy.apply(&deposit(6, 1));
        assert_eq!(account, copy);
        assert_eq!(account.recorded_operation(3), None);
    }

    #[test]
    fn spec_example() {
        let mut account = Account::new(400);
        assert_eq!(account.query(), Outcome::Balance(400));
        assert_eq!(account.apply(&deposit(2, 170)).outcome, Outcome::Success);
        assert_eq!(account.query(), Outcome::Balance(570));
        assert_eq!(account.apply(&withdraw(4, 70)).outcome, Outcome::Success);
        assert_eq!(account.query(), Outcome::Balance(500));
    }

    #[test]
    fn overdraw_fails_and_changes_nothing() {
        let mut account = Account::new(100);
        let applied = account.apply(&withdraw(1, 101));
        assert_eq!(
            applied,
            Applied {
                outcome: Outcome::Fail,
                balance: 100
            }
        );
        assert_eq!(account.apply(&withdraw(2, 100)).outcome, Outcome::Success);
        assert_eq!(account.balance(), 0);
    }

    #[test]
    fn deposit_beyond_wire_limit_fails() {
        let mut account = Account::new(MAX_BALANCE - 5);
        assert_eq!(account.apply(&deposit(1, 6)).outcome, Outcome::Fail);
        assert_eq!(account.apply(&deposit(2, 5)).outcome, Outcome::Success);
        assert_eq!(account.balance(), MAX_BALANCE);
        assert_eq!(account.apply(&deposit(3, u64::MAX)).outcome, Outcome::Fail);
    }

    #[test]
    fn repeated_event_id_is_applied_once_and_answers_the_recorded_result() {
        let mut account = Account::new(100);
        assert_eq!(account.apply(&withdraw(1, 60)).outcome, Outcome::Success);
        assert_eq!(account.apply(&withdraw(1, 60)).outcome, Outcome::Success);
        assert_eq!(account.balance(), 40);
        assert_eq!(account.apply(&withdraw(2, 60)).outcome, Outcome::Fail);
        assert_eq!(account.apply(&deposit(3, 100)).outcome, Outcome::Success);
        // The retried failure stays a failure although it would now succeed.
        assert_eq!(account.apply(&withdraw(2, 60)).outcome, Outcome::Fail);
        assert_eq!(account.balance(), 140);
        assert_eq!(account.recorded_events(), 3);
    }

    #[test]
    fn reused_event_id_for_another_operation_is_refused() {
        let mut account = Account::new(100);
        account.apply(&deposit(1, 10));
        let applied = account.apply(&withdraw(1, 10));
        assert_eq!(
            applied,
            Applied {
                outcome: Outcome::EventIdReused {
                    recorded: Operation::Deposit(10)
                },
                balance: 110
            }
        );
    }

    #[test]
    fn anonymous_commands_are_not_recorded() {
        let mut account = Account::new(0);
        let anonymous = Command::PropagateDeposit {
            event_id: None,
            amount: 5,
        };
        account.apply(&anonymous);
        account.apply(&anonymous);
        assert_eq!(account.balance(), 10);
        assert_eq!(account.recorded_events(), 0);
        assert_eq!(Command::for_request(None, Operation::Query), None);
    }

    #[test]
    fn a_recorded_query_keeps_its_first_answer_and_changes_no_balance() {
        let mut account = Account::new(100);
        let record = |balance| Command::RecordQuery { event_id: 7, balance };
        assert_eq!(account.apply(&record(100)).outcome, Outcome::Balance(100));
        account.apply(&deposit(8, 50));
        assert_eq!(account.balance(), 150);
        // A later answer to the same query (another branch, after more writes) loses.
        assert_eq!(account.apply(&record(150)).outcome, Outcome::Balance(100));
        assert_eq!(account.recorded_query(7), Some(100));
        assert_eq!(account.recorded_operation(7), Some(Operation::Query));
        // A write under the query's id, and a query record under a write's id, are refused.
        assert_eq!(
            account.apply(&deposit(7, 1)).outcome,
            Outcome::EventIdReused {
                recorded: Operation::Query
            }
        );
        assert_eq!(
            account
                .apply(&Command::RecordQuery {
                    event_id: 8,
                    balance: 1
                })
                .outcome,
            Outcome::EventIdReused {
                recorded: Operation::Deposit(50)
            }
        );
        assert_eq!((account.balance(), account.recorded_query(8)), (150, None));
    }
}
