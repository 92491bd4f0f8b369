//! The course's output.json: one element per customer item in input order, written exactly as
//! the course's reference tooling (Python's `json.dump`) writes it, atomically.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::account::Operation;

/// One answer in a customer's `recv` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    Deposit { success: bool },
    Withdraw { success: bool },
    Query { balance: u64 },
}

impl Recv {
    pub fn interface(&self) -> &'static str {
        match self {
            Recv::Deposit { .. } => Operation::Deposit(0).interface(),
            Recv::Withdraw { .. } => Operation::Withdraw(0).interface(),
            Recv::Query { .. } => Operation::Query.interface(),
        }
    }

    /// The result in one word (span attributes).
    pub fn label(&self) -> &'static str {
        match self {
            Recv::Deposit { success: true } | Recv::Withdraw { success: true } | Recv::Query { .. } => "success",
            Recv::Deposit { success: false } | Recv::Withdraw { success: false } => "fail",
        }
    }
}

/// The output element for one customer item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerOutput {
    pub id: u64,
    pub recv: Vec<Recv>,
}

/// Renders the output the way `json.dump(data, f)` does (`", "` and `": "` separators, no
/// trailing newline), so files compare byte for byte with the course's reference outputs.
pub fn render(outputs: &[CustomerOutput]) -> String {
    let mut out = String::from("[");
    for (i, customer) in outputs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{{\"id\": {}, \"recv\": [", customer.id);
        for (j, recv) in customer.recv.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            let _ = match recv {
                Recv::Deposit { success } | Recv::Withdraw { success } => write!(
                    out,
                    "{{\"interface\": \"{}\", \"result\": \"{}\"}}",
                    recv.interface(),
                    if *success { "success" } else { "fail" }
                ),
                Recv::Query { balance } => write!(out, "{{\"interface\": \"query\", \"balance\": {balance}}}"),
            };
        }
        out.push_str("]}");
    }
    out.push(']');
    out
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, synced,
/// then renamed, so a failure never leaves a partial output.json behind.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = temporary_beside(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Checks, before any work, that [`write_atomic`] could write `path`: it is not a directory,
/// and its directory takes a new file (exists, writable, not a read-only file system).
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"));
    }
    let tmp = temporary_beside(path);
    std::fs::File::create(&tmp)?;
    std::fs::remove_file(&tmp)
}

/// The temporary file [`write_atomic`] writes before renaming it to `path`.
fn temporary_beside(path: &Path) -> std::path::PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_python_json_dump() {
        let outputs = vec![
            CustomerOutput {
                id: 1,
                recv: vec![Recv::Query { balance: 400 }],
            },
            CustomerOutput {
                id: 2,
                recv: vec![Recv::Deposit { success: true }, Recv::Query { balance: 570 }],
            },
            CustomerOutput {
                id: 3,
                recv: vec![Recv::Withdraw { success: false }],
            },
        ];
        assert_eq!(
            render(&outputs),
            r#"[{"id": 1, "recv": [{"interface": "query", "balance": 400}]}, {"id": 2, "recv": [{"interface": "deposit", "result": "success"}, {"interface": "query", "balance": 570}]}, {"id": 3, "recv": [{"interface": "withdraw", "result": "fail"}]}]"#
        );
        assert_eq!(render(&[]), "[]");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.json");
        write_atomic(&path, "[1]").expect("first write");
        write_atomic(&path, "[2]").expect("second write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "[2]");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn atomic_write_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("output.json");
        assert!(write_atomic(&path, "[]").is_err());
        assert!(!path.exists());
    }
}
