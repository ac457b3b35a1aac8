//! Gives a shared row-tier login role its password back after a tenant changed it.
//!
//! Any role may run `ALTER ROLE CURRENT_USER PASSWORD ...`, and PostgreSQL has no privilege
//! that stops it. On a role that many row tenants share, that would lock all of them out of
//! new server connections. With a registry, pgtenant holds both the role's password and the
//! server's admin credentials, so a refused login can put the password back.

use std::future::Future;
use std::pin::Pin;

use crate::config::RegistryConfig;

use super::provision;
use super::store::RegistryStore;

/// Puts a login role's password back on its server, with credentials pgtenant keeps for it.
pub trait RestoreRolePassword: Send + Sync {
    fn restore<'a>(
        &'a self,
        server: &'a str,
        role: &'a str,
        password: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
}

pub struct RegistryRoleRepair {
    cfg: RegistryConfig,
}

impl RegistryRoleRepair {
    pub fn new(cfg: RegistryConfig) -> RegistryRoleRepair {
        RegistryRoleRepair { cfg }
    }

    async fn run(&self, server: &str, role: &str, password: &str) -> Result<(), String> {
        // Only the shared row roles (`<row_database>.app`); a tenant's own role locks out no
        // one else.
        if !role.contains('.') {
            return Err(format!("\"{role}\" is not a shared row-tier role"));
        }
        let store = RegistryStore::open(&self.cfg)
            .await
            .map_err(|e| e.to_string())?;
        let holders = store
            .role_holders(server, role, "")
            .await
            .map_err(|e| e.to_string())?;
        let holder = holders
            .first()
            .ok_or_else(|| format!("no tenant in the registry holds role \"{role}\""))?;
        let current = store
            .role_password(holder, role)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the registry holds no password for \"{role}\""))?;
        // A proxy that has not seen a rotation yet must not put the old password back.
        if current.expose() != password {
            return Err("the registry holds a newer password for the role; waiting for it".into());
        }
        let admin = provision::admin_client(&store, server, "postgres")
            .await
            .map_err(|e| e.to_string())?;
        provision::ensure_login_role(&admin, role, password)
            .await
            .map_err(|e| crate::pg_error::describe_pg_error(&e))
    }
}

impl RestoreRolePassword for RegistryRoleRepair {
    fn restore<'a>(
        &'a self,
        server: &'a str,
        role: &'a str,
        password: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(self.run(server, role, password))
    }
}
