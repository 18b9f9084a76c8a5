//! Exists so that mesh-agent can name this crate as a build dependency (and be rebuilt when it
//! changes); the programs are in the `mesh-ebpf` binary target.
#![no_std]
