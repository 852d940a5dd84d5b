//! The owner's mark a tenant database carries, so that one whose registry row was lost can be
//! told apart from a stranger's and adopted.

use super::ProjectRecord;
use crate::tenancy::{InstanceId, ProjectId, TenantKey};

/// The project a tenant database was created for, and when: written as the comment of its
/// events table's `app_id` column. ClickHouse keeps it with the table's definition, so it is
/// there as soon as the table is; a mark is only trusted when the tenant key it derives names
/// the database it is found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub instance: InstanceId,
    pub project: ProjectId,
    /// The project's `created_at`, which its connection details show.
    pub created_at: u32,
}

impl Owner {
    const PREFIX: &'static str = "monitor-gateway project ";

    /// Built from a registry record's parsed fields only, never from request text.
    pub(super) fn mark(project: &ProjectRecord) -> String {
        Self {
            instance: project.instance.clone(),
            project: project.project,
            created_at: project.created_at,
        }
        .to_mark()
    }

    /// Only a mark exactly as [`Owner::mark`] writes it.
    pub(super) fn parse(mark: &str) -> Option<Self> {
        let mut fields = mark.strip_prefix(Self::PREFIX)?.split(' ');
        let owner = Self {
            instance: InstanceId::parse(fields.next()?).ok()?,
            project: ProjectId::parse(fields.next()?).ok()?,
            created_at: fields.next()?.parse().ok()?,
        };
        (fields.next().is_none() && owner.to_mark() == mark).then_some(owner)
    }

    fn to_mark(&self) -> String {
        format!(
            "{}{} {} {}",
            Self::PREFIX,
            self.instance,
            self.project,
            self.created_at
        )
    }

    pub(super) fn database(&self) -> String {
        TenantKey::derive(&self.instance, self.project).database()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ProjectRecord {
        let instance = InstanceId::parse("8F6E4253-4B5E-4A6C-9D55-3B0B6A1D2C7E").unwrap();
        ProjectRecord {
            created_at: 1_700_000_000,
            ..ProjectRecord::new(instance, ProjectId::new(42).unwrap())
        }
    }

    #[test]
    fn an_owner_mark_reads_back_as_the_project_it_was_written_for() {
        let record = record();
        let mark = Owner::mark(&record);
        assert_eq!(
            mark,
            "monitor-gateway project 8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e 42 1700000000"
        );
        let owner = Owner::parse(&mark).unwrap();
        assert_eq!(
            (&owner.instance, owner.project, owner.created_at),
            (&record.instance, record.project, record.created_at)
        );
        assert_eq!(owner.database(), record.tenant_key.database());
    }

    #[test]
    fn a_mark_that_is_not_exactly_an_owner_is_refused() {
        let instance = "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e";
        for mark in [
            String::new(),
            format!("{instance} 42 1700000000"),
            format!("monitor-gateway project {instance} 42"),
            format!("monitor-gateway project {instance} 42 1700000000 more"),
            format!("monitor-gateway project {instance} 042 1700000000"),
            format!("monitor-gateway project {instance} 0 1700000000"),
            "monitor-gateway project not-a-uuid 42 1700000000".to_owned(),
            format!("monitor-gateway project {instance} 42 -1"),
            format!("monitor-gateway project {instance} 42 +1700000000"),
            format!(
                "monitor-gateway project {} 42 1700000000",
                instance.to_uppercase()
            ),
        ] {
            assert_eq!(Owner::parse(&mark), None, "{mark:?}");
        }
    }
}
