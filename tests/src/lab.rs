//! The emulated enclave with Docker: the [`Topology`] plus dockerd inside the enclave.

use crate::docker::Docker;
use crate::topology::Topology;

/// Topology and dockerd. Fields drop in order: dockerd stops before its namespace goes.
#[derive(Debug)]
pub struct Lab {
    /// dockerd inside the enclave namespace.
    pub docker: Docker,
    /// Namespaces and the proxy pair.
    pub topo: Topology,
}

impl Lab {
    /// Builds the topology, then starts dockerd inside the enclave.
    pub fn start(host_extra: &[&str], enclave_extra: &[&str]) -> Lab {
        let topo = Topology::start(host_extra, enclave_extra);
        let docker = Docker::start(&topo.enclave);
        Lab { docker, topo }
    }
}
