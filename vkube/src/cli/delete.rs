//! `vkube delete NAME`.

use clap::Args;

use super::Target;

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub target: Target,
}

impl DeleteArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let _ = self.target;
        anyhow::bail!("vkube delete is not implemented yet")
    }
}
