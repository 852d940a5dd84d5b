//! Monitor Gateway's actors and the domain logic they own: issuers' key sets and token
//! verification, tenants and their projects, the registry in ClickHouse, and queries to Cube.
//! Nothing here knows about HTTP serving; the binary's edge translates requests into calls.

#![forbid(unsafe_code)]

pub mod auth;
pub mod code;
pub mod housekeeper;
pub mod lifecycle;
pub mod query;
pub mod registry;
pub mod results;
pub mod settings;
pub mod signer;
pub mod supervisor;
pub mod tenancy;
pub mod tenant;
pub mod tenants;

pub use code::ErrorCode;
