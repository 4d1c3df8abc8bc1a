//! volmig operator: the master of the node agents in a cluster. It
//! reconciles VolumeMigration resources, keeps each session's record (the
//! communication data set) in the resource's status and drives the phases
//! through `volmig_master::Driver`.

pub mod crd_gen;
