//! Cluster formation: the voters initialize Raft, and the leader adds every other configured
//! branch as a non-voting replica.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use tokio_util::sync::CancellationToken;

use super::{Branch, BranchConfig};
use crate::replication::NodeId;

/// Forms the cluster: the lowest-id voter initializes the voters; whichever voter leads adds
/// every other configured branch as a non-voting replica (learner) once the voters' own
/// membership entry has been applied (openraft refuses overlapping membership changes).
pub(super) async fn manage_membership(config: BranchConfig, branch: Branch, stop: CancellationToken) {
    let raft = branch.raft().clone();
    let voters = config.voter_ids();
    let node = |id: &NodeId| BasicNode::new(config.members.get(id).cloned().unwrap_or_default());
    if voters.first() == Some(&config.id) {
        match raft.is_initialized().await {
            Ok(false) => {
                let members: BTreeMap<NodeId, BasicNode> = voters.iter().map(|id| (*id, node(id))).collect();
                if let Err(e) = raft.initialize(members).await {
                    tracing::warn!(branch = config.id, error = %e, "initialize");
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(branch = config.id, error = %e, "is_initialized"),
        }
    }
    if !voters.contains(&config.id) {
        return;
    }
    // Woken by changes of leader, vote or membership (server metrics), and of the applied
    // index only while a membership entry waits to be applied. The full metrics change with
    // every acknowledgement from every peer: on a 50-branch leader, ~50 times per write.
    let mut server = raft.server_metrics();
    let mut data = raft.data_metrics();
    loop {
        let (missing, settled) = {
            let m = server.borrow_and_update();
            let applied = data.borrow_and_update().last_applied.map(|id| id.index);
            let settled = m.membership_config.log_id().map(|id| id.index) <= applied;
            let missing: BTreeMap<NodeId, BasicNode> = if m.current_leader != Some(config.id) || !settled {
                BTreeMap::new()
            } else {
                let present: BTreeSet<NodeId> = m.membership_config.nodes().map(|(id, _)| *id).collect();
                config
                    .members
                    .keys()
                    .filter(|id| !present.contains(id))
                    .map(|id| (*id, node(id)))
                    .collect()
            };
            (missing, settled)
        };
        if !missing.is_empty() {
            let count = missing.len();
            match raft.change_membership(ChangeMembers::AddNodes(missing), false).await {
                Ok(_) => tracing::info!(branch = config.id, learners = count, "added non-voting replicas"),
                Err(e) => tracing::debug!(branch = config.id, error = %e, "adding replicas; will retry"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = server.changed() => if changed.is_err() { return },
            changed = data.changed(), if !settled => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
