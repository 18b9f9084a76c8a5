//! The data path: where captured connections are accepted, and where they are forwarded.

pub mod outbound;
mod relay;

pub use relay::Transferred;
