//! openraft's own conformance suite for log and state-machine stores (`openraft::testing`),
//! run against both of ours: in memory, and backed by a data directory. It checks what Raft
//! relies on and the rest of the tests only reach by chance: vote and log persistence, log
//! ids after purges and truncations, membership recovery, applying entries, and building,
//! transferring and installing snapshots.

use distbank::replication::TypeConfig;
use distbank::replication::store::{LogStore, StateMachine, Storage};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct InMemory;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for InMemory {
    async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError<u64>> {
        let storage = Storage::in_memory(1, 100);
        Ok(((), storage.log, storage.state))
    }
}

/// Every store the suite builds gets a fresh data directory, removed when the guard drops.
struct OnDisk;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for OnDisk {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let storage = Storage::open(dir.path(), 1, 100).expect("a fresh data directory opens");
        Ok((dir, storage.log, storage.state))
    }
}

#[test]
fn the_in_memory_store_passes_openrafts_storage_suite() {
    Suite::test_all(InMemory).expect("storage suite");
}

#[test]
fn the_data_directory_store_passes_openrafts_storage_suite() {
    Suite::test_all(OnDisk).expect("storage suite");
}
