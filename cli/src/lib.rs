//! Library part of the `volmig` package: the `kubectl volmig` plugin
//! (feature `kubectl`), so the `volmig` binary itself never needs kube.

#[cfg(feature = "kubectl")]
pub mod kubectl;
