//! Loads and validates the course's `input.json`.
//!
//! The file is one JSON array of branch and customer items in any order (see
//! `formats.md`). It is read through [`serde_json::Value`] rather than derived
//! `Deserialize` impls so that every error can name the exact place in the
//! file, JSONPath-style (`input.json: $[4].events[1].money: ...`), together
//! with what was expected and what was found.
//!
//! Besides the shape of each item, [`parse`] checks the properties the rest of
//! the system relies on: at least one branch, unique branch and event ids,
//! equal initial balances (branches are replicas of one account), a branch for
//! every customer (customer N talks to branch N) and that no sequence of
//! operations can push the balance past the int32 wire format.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::account::{MAX_BALANCE, Operation};

/// A validated input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Branch items, in input order.
    pub branches: Vec<BranchSpec>,
    /// Customer items, in input order; the same id may occur more than once.
    pub customers: Vec<CustomerSpec>,
}

/// One `"type": "branch"` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchSpec {
    /// Branch id, at least 1.
    pub id: u64,
    /// Initial balance, at most [`MAX_BALANCE`].
    pub balance: u64,
}

/// One `"type": "customer"` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerSpec {
    /// Customer id, at least 1; also the id of the branch it talks to.
    pub id: u64,
    /// Events in input order.
    pub events: Vec<Event>,
}

/// One customer event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Event id, unique across the whole file.
    pub id: u64,
    /// What the customer asks its branch to do.
    pub operation: Operation,
}

impl Input {
    /// The initial balance shared by every branch.
    ///
    /// [`parse`] guarantees there is at least one branch and that all agree;
    /// for a hand-built `Input` without branches this is 0.
    #[must_use]
    pub fn initial_balance(&self) -> u64 {
        self.branches.first().map_or(0, |branch| branch.balance)
    }

    /// All branch ids, sorted ascending.
    #[must_use]
    pub fn branch_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.branches.iter().map(|branch| branch.id).collect();
        ids.sort_unstable();
        ids
    }

    /// The number of events over all customer items.
    #[must_use]
    pub fn event_count(&self) -> usize {
        self.customers.iter().map(|customer| customer.events.len()).sum()
    }
}

/// Why an input file was rejected.
///
/// Every message is a single line of the form `FILE: LOCATION: problem`,
/// where LOCATION is a JSONPath-like position such as `$[4].events[1].money`,
/// optionally followed by the item it belongs to, e.g. `$[7] (branch 3)`.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read.
    // The io::Error is part of the message rather than a `#[source]`, so that
    // error-chain printers do not repeat it.
    #[error("{file}: cannot read the input file: {error}")]
    Io { file: String, error: std::io::Error },

    /// The text is not JSON; `serde_json`'s message carries line and column.
    #[error("{file}: not valid JSON: {error}")]
    Json { file: String, error: serde_json::Error },

    /// The top level or a customer's `events` is not an array.
    #[error("{file}: {location}: expected {expected}, found {found}")]
    NotAnArray {
        file: String,
        location: String,
        expected: &'static str,
        found: String,
    },

    /// An item or an event is not an object.
    #[error("{file}: {location}: expected {expected}, found {found}")]
    NotAnObject {
        file: String,
        location: String,
        expected: &'static str,
        found: String,
    },

    /// A required field is absent.
    #[error("{file}: {location}: missing field \"{field}\" (expected {expected})")]
    MissingField {
        file: String,
        location: String,
        field: &'static str,
        expected: &'static str,
    },

    /// An item's `type` is not `"branch"` or `"customer"`.
    #[error("{file}: {location}: unknown item type: expected \"branch\" or \"customer\", found {found}")]
    UnknownType {
        file: String,
        location: String,
        found: String,
    },

    /// An event's `interface` is not `"deposit"`, `"withdraw"` or `"query"`.
    #[error("{file}: {location}: unknown interface: expected \"deposit\", \"withdraw\" or \"query\", found {found}")]
    UnknownInterface {
        file: String,
        location: String,
        found: String,
    },

    /// A number field holds a non-number, a fraction, a negative number or a
    /// forbidden zero.
    #[error("{file}: {location}: expected {expected}, found {found}")]
    InvalidNumber {
        file: String,
        location: String,
        expected: &'static str,
        found: String,
    },

    /// A number field exceeds its limit.
    #[error("{file}: {location}: expected at most {limit} ({reason}), found {found}")]
    TooLarge {
        file: String,
        location: String,
        limit: u64,
        reason: &'static str,
        found: String,
    },

    /// Two branch items share an id.
    #[error("{file}: {location}: duplicate branch id {id} (first at {first})")]
    DuplicateBranch {
        file: String,
        location: String,
        id: u64,
        first: String,
    },

    /// Two events share an id (event ids are unique across the file).
    #[error("{file}: {location}: duplicate event id {id} (first at {first})")]
    DuplicateEvent {
        file: String,
        location: String,
        id: u64,
        first: String,
    },

    /// Two branches start with different balances.
    #[error(
        "{file}: {location}: initial balance {balance} differs from branch {first_id}'s {first_balance} (at {first_location}); branches are replicas of one account and must start equal"
    )]
    BalanceMismatch {
        file: String,
        location: String,
        balance: u64,
        first_id: u64,
        first_balance: u64,
        first_location: String,
    },

    /// The file has no branch item.
    #[error("{file}: $: no branches: expected at least one item with \"type\": \"branch\"")]
    NoBranches { file: String },

    /// A customer item has no branch with its id.
    // Only the count and range of branch ids are reported: the list can be long.
    #[error(
        "{file}: {location}: no branch {customer} for customer {customer} (customer N talks to branch N; {})",
        branch_summary(*.branch_count, *.lowest, *.highest)
    )]
    UnknownBranch {
        file: String,
        location: String,
        customer: u64,
        branch_count: usize,
        lowest: u64,
        highest: u64,
    },

    /// The initial balance plus all deposits could exceed the wire format.
    #[error(
        "{file}: {location}: initial balance {initial} plus the deposits up to here total {total}, which would exceed the {MAX_BALANCE} limit of the wire format (int32 balances)"
    )]
    Overflow {
        file: String,
        location: String,
        initial: u64,
        total: u64,
    },
}

/// Reads and validates the input file at `path`; errors name the path.
///
/// # Errors
/// [`InputError::Io`] if the file cannot be read, otherwise as [`parse`].
pub fn load(path: &Path) -> Result<Input, InputError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| InputError::Io {
        file: file.clone(),
        error,
    })?;
    parse(&text, &file)
}

/// Parses and validates `text`; `source` is the file name used in messages.
///
/// # Errors
/// The first problem found, in file order for problems within one item,
/// then missing branches, unknown customer branches and overflow.
pub fn parse(text: &str, source: &str) -> Result<Input, InputError> {
    let root: Value = serde_json::from_str(text).map_err(|error| InputError::Json {
        file: source.to_owned(),
        error,
    })?;
    let mut parser = Parser::new(source);
    parser.document(&root)?;
    parser.finish()
}

/// The accepted range of a number field and how to describe it.
struct Bounds {
    min: u64,
    max: u64,
    /// What a valid value is, e.g. "a positive integer".
    expected: &'static str,
    /// Why `max` is the limit.
    reason: &'static str,
}

const WIRE_LIMIT: &str = "the int32 limit of the wire format";

const ITEM_ID: Bounds = Bounds {
    min: 1,
    max: u64::MAX,
    expected: "a positive integer",
    reason: "the largest supported id",
};
const EVENT_ID: Bounds = Bounds {
    min: 0,
    max: u64::MAX,
    expected: "a non-negative integer",
    reason: "the largest supported id",
};
const BALANCE: Bounds = Bounds {
    min: 0,
    max: MAX_BALANCE,
    expected: "a non-negative integer",
    reason: WIRE_LIMIT,
};
const MONEY: Bounds = Bounds {
    min: 1,
    max: MAX_BALANCE,
    expected: "a positive integer",
    reason: WIRE_LIMIT,
};

/// The two kinds of top-level item.
#[derive(Clone, Copy)]
enum Kind {
    Branch,
    Customer,
}

/// Accumulates validated items; positions are kept as indices and only
/// formatted into paths when an error needs them.
struct Parser<'a> {
    file: &'a str,
    branches: Vec<BranchSpec>,
    /// Item index of each entry of `branches`.
    branch_items: Vec<usize>,
    /// Branch id -> item index.
    branch_at: HashMap<u64, usize>,
    customers: Vec<CustomerSpec>,
    /// Item index of each entry of `customers`.
    customer_items: Vec<usize>,
    /// Event id -> (item index, event index) of its first occurrence.
    event_at: HashMap<u64, (usize, usize)>,
    /// Every deposit as (item index, event index, amount), in input order.
    deposits: Vec<(usize, usize, u64)>,
}

fn item_path(item: usize) -> String {
    format!("$[{item}]")
}

fn event_path(item: usize, event: usize) -> String {
    format!("$[{item}].events[{event}]")
}

impl<'a> Parser<'a> {
    fn new(file: &'a str) -> Self {
        Self {
            file,
            branches: Vec::new(),
            branch_items: Vec::new(),
            branch_at: HashMap::new(),
            customers: Vec::new(),
            customer_items: Vec::new(),
            event_at: HashMap::new(),
            deposits: Vec::new(),
        }
    }

    fn file(&self) -> String {
        self.file.to_owned()
    }

    fn document(&mut self, root: &Value) -> Result<(), InputError> {
        let Value::Array(items) = root else {
            return Err(InputError::NotAnArray {
                file: self.file(),
                location: "$".to_owned(),
                expected: "an array of branch and customer items",
                found: describe(root),
            });
        };
        items
            .iter()
            .enumerate()
            .try_for_each(|(index, item)| self.item(index, item))
    }

    fn item(&mut self, index: usize, value: &Value) -> Result<(), InputError> {
        let path = item_path(index);
        let Value::Object(object) = value else {
            return Err(InputError::NotAnObject {
                file: self.file(),
                location: path,
                expected: "an object (a branch or customer item)",
                found: describe(value),
            });
        };
        let kind = match object.get("type") {
            None => {
                return Err(self.missing(path, "type", "\"branch\" or \"customer\""));
            }
            Some(Value::String(name)) if name == "branch" => Kind::Branch,
            Some(Value::String(name)) if name == "customer" => Kind::Customer,
            Some(other) => {
                return Err(InputError::UnknownType {
                    file: self.file(),
                    location: format!("{path}.type"),
                    found: describe(other),
                });
            }
        };
        let name = match kind {
            Kind::Branch => "branch",
            Kind::Customer => "customer",
        };
        let id = self.number(object, &path, &format!("{path} ({name})"), "id", &ITEM_ID)?;
        let owner = format!("{path} ({name} {id})");
        match kind {
            Kind::Branch => self.branch(index, object, id, &path, owner),
            Kind::Customer => self.customer(index, object, id, &path, owner),
        }
    }

    fn branch(
        &mut self,
        index: usize,
        object: &Map<String, Value>,
        id: u64,
        path: &str,
        owner: String,
    ) -> Result<(), InputError> {
        let balance = self.number(object, path, &owner, "balance", &BALANCE)?;
        if let Some(&first) = self.branch_at.get(&id) {
            return Err(InputError::DuplicateBranch {
                file: self.file(),
                location: owner,
                id,
                first: item_path(first),
            });
        }
        // Comparing with the first branch is enough: all earlier ones equal it.
        if let Some((first, &first_item)) = self.branches.first().zip(self.branch_items.first())
            && first.balance != balance
        {
            return Err(InputError::BalanceMismatch {
                file: self.file(),
                location: owner,
                balance,
                first_id: first.id,
                first_balance: first.balance,
                first_location: item_path(first_item),
            });
        }
        self.branch_at.insert(id, index);
        self.branches.push(BranchSpec { id, balance });
        self.branch_items.push(index);
        Ok(())
    }

    fn customer(
        &mut self,
        index: usize,
        object: &Map<String, Value>,
        id: u64,
        path: &str,
        owner: String,
    ) -> Result<(), InputError> {
        let values = match object.get("events") {
            None => return Err(self.missing(owner, "events", "an array of events")),
            Some(Value::Array(values)) => values,
            Some(other) => {
                return Err(InputError::NotAnArray {
                    file: self.file(),
                    location: format!("{path}.events"),
                    expected: "an array of events",
                    found: describe(other),
                });
            }
        };
        let events = values
            .iter()
            .enumerate()
            .map(|(position, value)| self.event(index, position, value))
            .collect::<Result<Vec<_>, _>>()?;
        self.customers.push(CustomerSpec { id, events });
        self.customer_items.push(index);
        Ok(())
    }

    fn event(&mut self, item: usize, position: usize, value: &Value) -> Result<Event, InputError> {
        let path = event_path(item, position);
        let Value::Object(object) = value else {
            return Err(InputError::NotAnObject {
                file: self.file(),
                location: path,
                expected: "an event object",
                found: describe(value),
            });
        };
        let id = self.number(object, &path, &path, "id", &EVENT_ID)?;
        let interface = match object.get("interface") {
            None => {
                return Err(self.missing(
                    format!("{path} (event {id})"),
                    "interface",
                    "\"deposit\", \"withdraw\" or \"query\"",
                ));
            }
            Some(Value::String(name)) if matches!(name.as_str(), "deposit" | "withdraw" | "query") => name.as_str(),
            Some(other) => {
                return Err(InputError::UnknownInterface {
                    file: self.file(),
                    location: format!("{path}.interface"),
                    found: describe(other),
                });
            }
        };
        let owner = format!("{path} ({interface} event {id})");
        // Older files put "money" on queries too; it means nothing there, so
        // it is not even looked at.
        let operation = match interface {
            "deposit" => Operation::Deposit(self.number(object, &path, &owner, "money", &MONEY)?),
            "withdraw" => Operation::Withdraw(self.number(object, &path, &owner, "money", &MONEY)?),
            _ => Operation::Query,
        };
        if let Some(&(first_item, first_event)) = self.event_at.get(&id) {
            return Err(InputError::DuplicateEvent {
                file: self.file(),
                location: owner,
                id,
                first: event_path(first_item, first_event),
            });
        }
        self.event_at.insert(id, (item, position));
        if let Operation::Deposit(amount) = operation {
            self.deposits.push((item, position, amount));
        }
        Ok(Event { id, operation })
    }

    /// Cross-item checks that need the whole file.
    fn finish(self) -> Result<Input, InputError> {
        let Some(initial) = self.branches.first().map(|branch| branch.balance) else {
            return Err(InputError::NoBranches { file: self.file() });
        };
        for (customer, &item) in self.customers.iter().zip(&self.customer_items) {
            if !self.branch_at.contains_key(&customer.id) {
                let ids = self.branches.iter().map(|branch| branch.id);
                return Err(InputError::UnknownBranch {
                    file: self.file(),
                    location: format!("{} (customer {})", item_path(item), customer.id),
                    customer: customer.id,
                    branch_count: self.branches.len(),
                    lowest: ids.clone().min().unwrap_or(0),
                    highest: ids.max().unwrap_or(0),
                });
            }
        }
        // Withdrawals only lower the balance, so initial + all deposits bounds
        // every balance any interleaving can reach.
        let mut total = initial;
        for &(item, position, amount) in &self.deposits {
            match total.checked_add(amount) {
                Some(sum) if sum <= MAX_BALANCE => total = sum,
                sum => {
                    return Err(InputError::Overflow {
                        file: self.file(),
                        location: format!("{}.money", event_path(item, position)),
                        initial,
                        total: sum.unwrap_or(u64::MAX),
                    });
                }
            }
        }
        Ok(Input {
            branches: self.branches,
            customers: self.customers,
        })
    }

    /// Reads `object[field]` as an integer within `bounds`.
    ///
    /// `path` is the object's bare path (value errors point at the field),
    /// `owner` its labelled form (a missing field is the object's problem).
    fn number(
        &self,
        object: &Map<String, Value>,
        path: &str,
        owner: &str,
        field: &'static str,
        bounds: &Bounds,
    ) -> Result<u64, InputError> {
        let Some(value) = object.get(field) else {
            return Err(self.missing(owner.to_owned(), field, bounds.expected));
        };
        let location = || format!("{path}.{field}");
        let invalid = || InputError::InvalidNumber {
            file: self.file(),
            location: location(),
            expected: bounds.expected,
            found: describe(value),
        };
        let too_large = || InputError::TooLarge {
            file: self.file(),
            location: location(),
            limit: bounds.max,
            reason: bounds.reason,
            found: describe(value),
        };
        match whole_number(value) {
            Whole::Fits(n) if n < bounds.min => Err(invalid()),
            Whole::Fits(n) if n > bounds.max => Err(too_large()),
            Whole::Fits(n) => Ok(n),
            Whole::BeyondU64 => Err(too_large()),
            Whole::Negative | Whole::NotAnInteger => Err(invalid()),
        }
    }

    fn missing(&self, location: String, field: &'static str, expected: &'static str) -> InputError {
        InputError::MissingField {
            file: self.file(),
            location,
            field,
            expected,
        }
    }
}

/// A JSON value read as a whole number.
enum Whole {
    Fits(u64),
    Negative,
    /// A whole number too big for `u64` (`serde_json` reads such integers as `f64`).
    BeyondU64,
    /// Not a number, a fraction, or not finite.
    NotAnInteger,
}

fn whole_number(value: &Value) -> Whole {
    // 2^64 is exactly representable; every whole f64 below it fits in u64.
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
    let Value::Number(number) = value else {
        return Whole::NotAnInteger;
    };
    if let Some(n) = number.as_u64() {
        return Whole::Fits(n);
    }
    if number.is_i64() {
        return Whole::Negative;
    }
    match number.as_f64() {
        // Integral floats such as 10.0 come from older files: accept them.
        Some(f) if f.is_finite() && f.fract() == 0.0 => {
            if f < 0.0 {
                Whole::Negative
            } else if f < TWO_POW_64 {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "exact: f is whole, non-negative and below 2^64"
                )]
                let n = f as u64;
                Whole::Fits(n)
            } else {
                Whole::BeyondU64
            }
        }
        _ => Whole::NotAnInteger,
    }
}

/// "the file has 3 branches, ids 1 to 9": enough to spot the mistake
/// without listing every id.
fn branch_summary(count: usize, lowest: u64, highest: u64) -> String {
    if count == 1 {
        format!("the file has 1 branch, id {lowest}")
    } else {
        format!("the file has {count} branches, ids {lowest} to {highest}")
    }
}

/// A short, single-line description of a JSON value for "found ..." text.
fn describe(value: &Value) -> String {
    const MAX_CHARS: usize = 40;
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let count = s.chars().count();
            if count > MAX_CHARS {
                let head: String = s.chars().take(MAX_CHARS).collect();
                // Value's Display quotes and escapes, keeping it on one line.
                format!("the string {}... ({count} characters)", Value::String(head))
            } else {
                format!("the string {value}")
            }
        }
        Value::Array(items) if items.len() == 1 => "an array of 1 element".to_owned(),
        Value::Array(items) => format!("an array of {} elements", items.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRANCH_1: &str = r#"{"id": 1, "type": "branch", "balance": 400}"#;

    /// Builds an input file from item texts.
    fn file(items: &[&str]) -> String {
        format!("[{}]", items.join(",\n"))
    }

    /// A file with branch 1 and one customer 1 holding `events`.
    fn with_events(events: &str) -> String {
        file(&[
            &format!(r#"{{"id": 1, "type": "customer", "events": [{events}]}}"#),
            BRANCH_1,
        ])
    }

    fn parse_ok(text: &str) -> Input {
        match parse(text, "input.json") {
            Ok(input) => input,
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    fn parse_err(text: &str) -> InputError {
        match parse(text, "input.json") {
            Ok(input) => panic!("expected an error, parsed {input:?}"),
            Err(error) => error,
        }
    }

    /// Asserts the message is one line, names the file and contains `parts`.
    fn assert_message(error: &InputError, parts: &[&str]) {
        let message = error.to_string();
        assert!(!message.contains('\n'), "multi-line message: {message}");
        assert!(message.starts_with("input.json: "), "no file name: {message}");
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    #[test]
    fn spec_example_parses() {
        let input = parse_ok(
            r#"[
              {"id": 1, "type": "customer", "events": [{"id": 1, "interface": "query"}]},
              {"id": 2, "type": "customer", "events": [{"id": 2, "interface": "deposit", "money": 170},
                                                       {"id": 3, "interface": "query"}]},
              {"id": 3, "type": "customer", "events": [{"id": 4, "interface": "withdraw", "money": 70},
                                                       {"id": 5, "interface": "query"}]},
              {"id": 1, "type": "branch", "balance": 400},
              {"id": 2, "type": "branch", "balance": 400},
              {"id": 3, "type": "branch", "balance": 400}
            ]"#,
        );
        let event = |id, operation| Event { id, operation };
        assert_eq!(
            input,
            Input {
                branches: (1..=3).map(|id| BranchSpec { id, balance: 400 }).collect(),
                customers: vec![
                    CustomerSpec {
                        id: 1,
                        events: vec![event(1, Operation::Query)],
                    },
                    CustomerSpec {
                        id: 2,
                        events: vec![event(2, Operation::Deposit(170)), event(3, Operation::Query)],
                    },
                    CustomerSpec {
                        id: 3,
                        events: vec![event(4, Operation::Withdraw(70)), event(5, Operation::Query)],
                    },
                ],
            }
        );
        assert_eq!(input.initial_balance(), 400);
        assert_eq!(input.branch_ids(), vec![1, 2, 3]);
        assert_eq!(input.event_count(), 5);
    }

    #[test]
    fn branch_ids_are_sorted_and_items_keep_input_order() {
        let input = parse_ok(&file(&[
            r#"{"id": 3, "type": "branch", "balance": 7}"#,
            r#"{"id": 1, "type": "branch", "balance": 7}"#,
            r#"{"id": 2, "type": "branch", "balance": 7}"#,
        ]));
        assert_eq!(input.branch_ids(), vec![1, 2, 3]);
        let order: Vec<u64> = input.branches.iter().map(|b| b.id).collect();
        assert_eq!(order, vec![3, 1, 2]);
        assert_eq!(input.initial_balance(), 7);
        assert_eq!(input.event_count(), 0);
    }

    #[test]
    fn money_on_query_is_ignored() {
        let input = parse_ok(&with_events(
            r#"{"id": 1, "interface": "query", "money": 400},
               {"id": 2, "interface": "query", "money": -5},
               {"id": 3, "interface": "query", "money": "lots"},
               {"id": 4, "interface": "query", "money": 1e30}"#,
        ));
        assert!(
            input.customers[0]
                .events
                .iter()
                .all(|event| event.operation == Operation::Query)
        );
    }

    #[test]
    fn integral_float_money_is_accepted() {
        let input = parse_ok(&with_events(
            r#"{"id": 1, "interface": "deposit", "money": 10.0},
               {"id": 2, "interface": "withdraw", "money": 5.0}"#,
        ));
        let operations: Vec<Operation> = input.customers[0].events.iter().map(|event| event.operation).collect();
        assert_eq!(operations, vec![Operation::Deposit(10), Operation::Withdraw(5)]);
    }

    #[test]
    fn repeated_customer_ids_are_separate_items() {
        let input = parse_ok(&file(&[
            r#"{"id": 1, "type": "customer", "events": [{"id": 1, "interface": "deposit", "money": 10}]}"#,
            r#"{"id": 1, "type": "customer", "events": [{"id": 2, "interface": "withdraw", "money": 10}]}"#,
            BRANCH_1,
        ]));
        assert_eq!(input.customers.len(), 2);
        assert_eq!(input.customers[0].id, 1);
        assert_eq!(input.customers[1].id, 1);
        assert_eq!(input.customers[1].events[0].id, 2);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let input = parse_ok(&file(&[
            r#"{"id": 1, "type": "customer", "note": {"x": 1},
                "events": [{"id": 1, "interface": "query", "branch": 2}]}"#,
            r#"{"id": 1, "type": "branch", "balance": 400, "port": 50051}"#,
        ]));
        assert_eq!(input.customers[0].events[0].operation, Operation::Query);
    }

    #[test]
    fn event_id_zero_and_empty_events_are_accepted() {
        let input = parse_ok(&with_events(r#"{"id": 0, "interface": "query"}"#));
        assert_eq!(input.customers[0].events[0].id, 0);
        let input = parse_ok(&with_events(""));
        assert!(input.customers[0].events.is_empty());
    }

    #[test]
    fn unreadable_file() {
        let path = std::env::temp_dir().join("distbank-input-test-no-such-file.json");
        let error = match load(&path) {
            Ok(input) => panic!("expected an error, parsed {input:?}"),
            Err(error) => error,
        };
        assert!(matches!(error, InputError::Io { .. }));
        let message = error.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(message.contains("cannot read"), "{message}");
    }

    #[test]
    fn load_reads_a_file() {
        let path = std::env::temp_dir().join(format!("distbank-input-test-{}.json", std::process::id()));
        std::fs::write(&path, with_events(r#"{"id": 1, "interface": "query"}"#)).unwrap();
        let loaded = load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.unwrap().event_count(), 1);
    }

    #[test]
    fn not_json() {
        let error = parse_err("[\n  {\"id\": 1,,}\n]");
        assert!(matches!(error, InputError::Json { .. }));
        assert_message(&error, &["not valid JSON", "line 2", "column"]);
    }

    #[test]
    fn top_level_not_an_array() {
        let error = parse_err(r#"{"id": 1, "type": "branch", "balance": 400}"#);
        assert!(matches!(error, InputError::NotAnArray { .. }));
        assert_message(&error, &["$: expected an array", "found an object"]);
    }

    #[test]
    fn item_not_an_object() {
        let error = parse_err(&file(&[BRANCH_1, "5"]));
        assert!(matches!(error, InputError::NotAnObject { .. }));
        assert_message(&error, &["$[1]: expected an object", "found 5"]);
    }

    #[test]
    fn type_missing() {
        let error = parse_err(&file(&[r#"{"id": 1, "balance": 400}"#]));
        assert!(matches!(error, InputError::MissingField { field: "type", .. }));
        assert_message(&error, &["$[0]: missing field \"type\"", "\"branch\" or \"customer\""]);
    }

    #[test]
    fn type_not_a_string() {
        let error = parse_err(&file(&[r#"{"id": 1, "type": 5, "balance": 400}"#]));
        assert!(matches!(error, InputError::UnknownType { .. }));
        assert_message(&error, &["$[0].type:", "\"branch\" or \"customer\"", "found 5"]);
    }

    #[test]
    fn type_unknown() {
        let error = parse_err(&file(&[BRANCH_1, r#"{"id": 1, "type": "bank"}"#]));
        assert!(matches!(error, InputError::UnknownType { .. }));
        assert_message(&error, &["$[1].type: unknown item type", "found the string \"bank\""]);
    }

    #[test]
    fn id_missing() {
        let error = parse_err(&file(&[r#"{"type": "branch", "balance": 400}"#]));
        assert!(matches!(error, InputError::MissingField { field: "id", .. }));
        assert_message(&error, &["$[0] (branch): missing field \"id\"", "a positive integer"]);
    }

    #[test]
    fn id_not_a_positive_integer() {
        for (id, found) in [
            ("0", "found 0"),
            ("-1", "found -1"),
            ("1.5", "found 1.5"),
            (r#""1""#, "found the string \"1\""),
            ("null", "found null"),
        ] {
            let error = parse_err(&file(&[&format!(
                r#"{{"id": {id}, "type": "customer", "events": []}}"#
            )]));
            assert!(matches!(error, InputError::InvalidNumber { .. }), "{error}");
            assert_message(&error, &["$[0].id: expected a positive integer", found]);
        }
    }

    #[test]
    fn huge_id() {
        for id in ["1e30", "99999999999999999999"] {
            let error = parse_err(&file(&[&format!(r#"{{"id": {id}, "type": "branch", "balance": 1}}"#)]));
            assert!(matches!(error, InputError::TooLarge { .. }), "{error}");
            assert_message(&error, &["$[0].id: expected at most 18446744073709551615", "found 1e"]);
        }
    }

    #[test]
    fn event_id_missing() {
        let error = parse_err(&with_events(r#"{"interface": "query"}"#));
        assert!(matches!(error, InputError::MissingField { field: "id", .. }));
        assert_message(
            &error,
            &["$[0].events[0]: missing field \"id\"", "a non-negative integer"],
        );
    }

    #[test]
    fn event_id_not_a_non_negative_integer() {
        for (id, found) in [("-3", "found -3"), ("2.5", "found 2.5"), ("true", "found true")] {
            let error = parse_err(&with_events(&format!(r#"{{"id": {id}, "interface": "query"}}"#)));
            assert!(matches!(error, InputError::InvalidNumber { .. }), "{error}");
            assert_message(&error, &["$[0].events[0].id: expected a non-negative integer", found]);
        }
    }

    #[test]
    fn balance_missing() {
        let error = parse_err(&file(&[r#"{"id": 2, "type": "branch"}"#]));
        assert!(matches!(error, InputError::MissingField { field: "balance", .. }));
        assert_message(&error, &["$[0] (branch 2): missing field \"balance\""]);
    }

    #[test]
    fn balance_negative() {
        let error = parse_err(&file(&[r#"{"id": 2, "type": "branch", "balance": -400}"#]));
        assert!(matches!(error, InputError::InvalidNumber { .. }));
        assert_message(&error, &["$[0].balance: expected a non-negative integer", "found -400"]);
    }

    #[test]
    fn balance_not_an_integer() {
        for (balance, found) in [("400.5", "found 400.5"), (r#""400""#, "the string \"400\"")] {
            let error = parse_err(&file(&[&format!(
                r#"{{"id": 2, "type": "branch", "balance": {balance}}}"#
            )]));
            assert!(matches!(error, InputError::InvalidNumber { .. }), "{error}");
            assert_message(&error, &["$[0].balance: expected a non-negative integer", found]);
        }
    }

    #[test]
    fn balance_too_large() {
        let error = parse_err(&file(&[r#"{"id": 2, "type": "branch", "balance": 2147483648}"#]));
        assert!(matches!(error, InputError::TooLarge { limit: MAX_BALANCE, .. }));
        assert_message(
            &error,
            &[
                "$[0].balance: expected at most 2147483647",
                "wire format",
                "found 2147483648",
            ],
        );
        // The limit itself is fine.
        let input = parse_ok(&file(&[r#"{"id": 2, "type": "branch", "balance": 2147483647}"#]));
        assert_eq!(input.initial_balance(), MAX_BALANCE);
    }

    #[test]
    fn events_missing() {
        let error = parse_err(&file(&[r#"{"id": 1, "type": "customer"}"#, BRANCH_1]));
        assert!(matches!(error, InputError::MissingField { field: "events", .. }));
        assert_message(
            &error,
            &["$[0] (customer 1): missing field \"events\"", "an array of events"],
        );
    }

    #[test]
    fn events_not_an_array() {
        let error = parse_err(&file(&[
            r#"{"id": 1, "type": "customer", "events": {"id": 1, "interface": "query"}}"#,
        ]));
        assert!(matches!(error, InputError::NotAnArray { .. }));
        assert_message(&error, &["$[0].events: expected an array of events", "found an object"]);
    }

    #[test]
    fn event_not_an_object() {
        let error = parse_err(&with_events(r#"{"id": 1, "interface": "query"}, "query""#));
        assert!(matches!(error, InputError::NotAnObject { .. }));
        assert_message(
            &error,
            &["$[0].events[1]: expected an event object", "found the string \"query\""],
        );
    }

    #[test]
    fn interface_missing() {
        let error = parse_err(&with_events(r#"{"id": 7, "money": 10}"#));
        assert!(matches!(error, InputError::MissingField { field: "interface", .. }));
        assert_message(
            &error,
            &[
                "$[0].events[0] (event 7): missing field \"interface\"",
                "\"deposit\", \"withdraw\" or \"query\"",
            ],
        );
    }

    #[test]
    fn interface_unknown() {
        for (interface, found) in [(r#""transfer""#, "the string \"transfer\""), ("3", "found 3")] {
            let error = parse_err(&with_events(&format!(
                r#"{{"id": 7, "interface": {interface}, "money": 10}}"#
            )));
            assert!(matches!(error, InputError::UnknownInterface { .. }), "{error}");
            assert_message(&error, &["$[0].events[0].interface: unknown interface", found]);
        }
    }

    #[test]
    fn money_missing() {
        for interface in ["deposit", "withdraw"] {
            let error = parse_err(&with_events(&format!(r#"{{"id": 7, "interface": "{interface}"}}"#)));
            assert!(matches!(error, InputError::MissingField { field: "money", .. }));
            assert_message(
                &error,
                &[
                    &format!("$[0].events[0] ({interface} event 7): missing field \"money\""),
                    "a positive integer",
                ],
            );
        }
    }

    #[test]
    fn money_negative_or_zero() {
        for (money, found) in [("-5", "found -5"), ("0", "found 0"), ("-1e30", "found -1e+30")] {
            let error = parse_err(&with_events(&format!(
                r#"{{"id": 1, "interface": "withdraw", "money": {money}}}"#
            )));
            assert!(matches!(error, InputError::InvalidNumber { .. }), "{error}");
            assert_message(&error, &["$[0].events[0].money: expected a positive integer", found]);
        }
    }

    #[test]
    fn money_not_an_integer() {
        for (money, found) in [
            ("10.5", "found 10.5"),
            (r#""10""#, "found the string \"10\""),
            ("true", "found true"),
            ("[10]", "found an array of 1 element"),
        ] {
            let error = parse_err(&with_events(&format!(
                r#"{{"id": 1, "interface": "deposit", "money": {money}}}"#
            )));
            assert!(matches!(error, InputError::InvalidNumber { .. }), "{error}");
            assert_message(&error, &["$[0].events[0].money: expected a positive integer", found]);
        }
    }

    #[test]
    fn money_too_large() {
        for (money, found) in [
            ("2147483648", "found 2147483648"),
            ("1e30", "found 1e+30"),
            ("99999999999999999999", "found 1e+20"),
        ] {
            let error = parse_err(&with_events(&format!(
                r#"{{"id": 1, "interface": "deposit", "money": {money}}}"#
            )));
            assert!(matches!(error, InputError::TooLarge { .. }), "{error}");
            assert_message(
                &error,
                &[
                    "$[0].events[0].money: expected at most 2147483647",
                    "wire format",
                    found,
                ],
            );
        }
    }

    #[test]
    fn duplicate_branch_id() {
        let error = parse_err(&file(&[
            r#"{"id": 1, "type": "customer", "events": []}"#,
            r#"{"id": 2, "type": "customer", "events": []}"#,
            r#"{"id": 3, "type": "customer", "events": []}"#,
            r#"{"id": 4, "type": "customer", "events": []}"#,
            r#"{"id": 5, "type": "customer", "events": []}"#,
            r#"{"id": 3, "type": "branch", "balance": 400}"#,
            r#"{"id": 1, "type": "branch", "balance": 400}"#,
            r#"{"id": 3, "type": "branch", "balance": 400}"#,
        ]));
        assert!(matches!(error, InputError::DuplicateBranch { id: 3, .. }));
        assert_eq!(
            error.to_string(),
            "input.json: $[7] (branch 3): duplicate branch id 3 (first at $[5])"
        );
    }

    #[test]
    fn duplicate_event_id_across_customers() {
        let error = parse_err(&file(&[
            r#"{"id": 1, "type": "customer", "events": [{"id": 1, "interface": "query"},
                                                         {"id": 2, "interface": "query"}]}"#,
            BRANCH_1,
            r#"{"id": 1, "type": "customer", "events": [{"id": 3, "interface": "query"},
                                                         {"id": 2, "interface": "deposit", "money": 5}]}"#,
        ]));
        assert!(matches!(error, InputError::DuplicateEvent { id: 2, .. }));
        assert_message(
            &error,
            &["$[2].events[1] (deposit event 2): duplicate event id 2 (first at $[0].events[1])"],
        );
    }

    #[test]
    fn customer_without_branch() {
        let mut items = vec![r#"{"id": 4, "type": "customer", "events": []}"#.to_owned()];
        items.extend((1..=3).map(|id| format!(r#"{{"id": {id}, "type": "branch", "balance": 1}}"#)));
        let items: Vec<&str> = items.iter().map(String::as_str).collect();
        let error = parse_err(&file(&items));
        assert!(matches!(error, InputError::UnknownBranch { customer: 4, .. }));
        assert_message(
            &error,
            &[
                "$[0] (customer 4): no branch 4 for customer 4",
                "the file has 3 branches, ids 1 to 3",
            ],
        );
        let error = parse_err(&file(&[BRANCH_1, r#"{"id": 2, "type": "customer", "events": []}"#]));
        assert_message(
            &error,
            &["$[1] (customer 2): no branch 2", "the file has 1 branch, id 1)"],
        );
    }

    #[test]
    fn no_branches() {
        let error = parse_err(&file(&[r#"{"id": 1, "type": "customer", "events": []}"#]));
        assert!(matches!(error, InputError::NoBranches { .. }));
        assert_message(&error, &["$: no branches", "\"type\": \"branch\""]);
        assert!(matches!(parse_err("[]"), InputError::NoBranches { .. }));
    }

    #[test]
    fn different_initial_balances() {
        let error = parse_err(&file(&[
            r#"{"id": 1, "type": "customer", "events": []}"#,
            r#"{"id": 1, "type": "branch", "balance": 400}"#,
            r#"{"id": 2, "type": "branch", "balance": 400}"#,
            r#"{"id": 3, "type": "branch", "balance": 500}"#,
        ]));
        assert!(matches!(error, InputError::BalanceMismatch { .. }));
        assert_message(
            &error,
            &[
                "$[3] (branch 3): initial balance 500 differs from branch 1's 400 (at $[1])",
                "replicas of one account",
            ],
        );
    }

    #[test]
    fn deposits_overflow_the_wire_format() {
        let error = parse_err(&file(&[
            r#"{"id": 1, "type": "customer", "events": [{"id": 1, "interface": "deposit", "money": 600}]}"#,
            r#"{"id": 1, "type": "branch", "balance": 2147483000}"#,
            r#"{"id": 1, "type": "customer", "events": [{"id": 2, "interface": "withdraw", "money": 600},
                                                         {"id": 3, "interface": "deposit", "money": 100}]}"#,
        ]));
        assert!(matches!(
            error,
            InputError::Overflow {
                total: 2_147_483_700,
                ..
            }
        ));
        assert_message(
            &error,
            &[
                "$[2].events[1].money: initial balance 2147483000 plus the deposits up to here total 2147483700",
                "exceed the 2147483647 limit of the wire format",
            ],
        );
        // Exactly at the limit is fine.
        let input = parse_ok(&with_events(
            r#"{"id": 1, "interface": "deposit", "money": 2147483247}"#,
        ));
        assert_eq!(input.initial_balance() + 2_147_483_247, MAX_BALANCE);
    }

    #[test]
    fn long_strings_are_shortened() {
        let long = "x".repeat(500);
        let error = parse_err(&file(&[&format!(r#"{{"id": 1, "type": "{long}"}}"#)]));
        let message = error.to_string();
        assert!(message.len() < 200, "{message}");
        assert!(message.contains("(500 characters)"), "{message}");
    }
}
