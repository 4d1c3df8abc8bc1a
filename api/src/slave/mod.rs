//! The slave contract: what a master asks of a node agent, one method per
//! gRPC call, in domain types ([`types`]). Implemented in-process by the
//! agent itself and remotely by the gRPC client, so the master's phase
//! driver cannot tell them apart. Protobuf appears only in [`wire`], where
//! the gRPC client and server convert.

mod error;
mod types;
pub mod wire;

use std::future::Future;

pub use error::{ErrorContext, ErrorKind, SlaveError, SlaveResult};
pub use types::*;

/// Calls `$m!` with every slave call as `name(Request) -> Response;`: the
/// one list the [`Slave`] trait, its forwarding impls and the gRPC client
/// (`volmig_master::GrpcSlave`) are generated from, so a new agent RPC is
/// added in one place (plus its implementations). The gRPC method of each
/// has the same name; requests and responses convert with
/// [`wire::IntoWire`]/[`wire::FromWire`].
#[macro_export]
macro_rules! slave_calls {
    ($m:ident) => {
        $m! {
            prepare($crate::slave::Prepare) -> $crate::slave::SessionState;
            copy_pass($crate::slave::CopyPass) -> $crate::slave::PassResult;
            set_mirror($crate::slave::SetMirror) -> $crate::slave::SessionState;
            quiesce($crate::slave::Quiesce) -> $crate::slave::QuiesceResult;
            release($crate::slave::Fence) -> $crate::slave::SessionState;
            synchronize($crate::slave::Fence) -> $crate::slave::SessionState;
            redirect($crate::slave::Redirect) -> $crate::slave::SessionState;
            resume($crate::slave::Fence) -> $crate::slave::ResumeResult;
            terminate($crate::slave::Terminate) -> $crate::slave::TerminateResult;
            abort($crate::slave::Fence) -> $crate::slave::SessionState;
            set_bandwidth($crate::slave::SetBandwidth) -> $crate::slave::SessionState;
            get_state($crate::slave::Fence) -> $crate::slave::SessionState;
            take_dirty($crate::slave::TakeDirty) -> $crate::slave::DirtyBatch;
            merge_dirty($crate::slave::MergeDirty) -> $crate::slave::SessionState;
            serve_volume($crate::slave::ServeVolume) -> $crate::slave::VolumeInfo;
            unserve_volume($crate::slave::UnserveVolume) -> $crate::slave::Unserved;
            list_volumes($crate::slave::ListVolumes) -> $crate::slave::VolumeList;
        }
    };
}

macro_rules! define_slave {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        /// One method per agent RPC; see `agent.proto` for their contracts.
        pub trait Slave: Send + Sync {
            $(fn $name(&self, r: $req) -> impl Future<Output = SlaveResult<$res>> + Send;)*
        }

        /// A shared slave is a slave.
        impl<T: Slave> Slave for std::sync::Arc<T> {
            $(fn $name(&self, r: $req) -> impl Future<Output = SlaveResult<$res>> + Send {
                (**self).$name(r)
            })*
        }
    };
}

slave_calls!(define_slave);
