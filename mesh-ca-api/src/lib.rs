//! Istio's certificate service, `istio.v1.auth.IstioCertificateService/CreateCertificate`: the
//! messages, a client and a server trait (generated from `proto/istio/v1/auth/ca.proto`).

#![allow(clippy::all, clippy::pedantic)]

/// The `istio.v1.auth` package.
pub mod auth {
    tonic::include_proto!("istio.v1.auth");
}

pub use auth::istio_certificate_service_client::IstioCertificateServiceClient;
pub use auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
pub use auth::{IstioCertificateRequest, IstioCertificateResponse};

/// The metadata key under which a node agent names the identity it asks for (as ztunnel does).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
