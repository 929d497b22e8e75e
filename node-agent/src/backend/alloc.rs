//! `alloc`: subnet allocation only, no forwarding (as Flannel's alloc backend). Useful when
//! something else routes (a cloud VPC, BGP), and for running agents without root.

use async_trait::async_trait;
use overlay_core::lease::{BackendData, Lease};
use overlay_core::BackendType;

use super::{Backend, BackendContext, BackendError, ReconcileReport};

pub struct AllocBackend {
    mtu: u32,
}

impl AllocBackend {
    pub fn new(ctx: BackendContext) -> Self {
        AllocBackend {
            mtu: ctx.config.mtu.unwrap_or(ctx.host.mtu),
        }
    }
}

#[async_trait]
impl Backend for AllocBackend {
    fn kind(&self) -> BackendType {
        BackendType::Alloc
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn prepare(&mut self) -> Result<BackendData, BackendError> {
        Ok(BackendData::default())
    }

    async fn reconcile(
        &mut self,
        _own: &Lease,
        _peers: &[Lease],
    ) -> Result<ReconcileReport, BackendError> {
        Ok(ReconcileReport::default())
    }
}
