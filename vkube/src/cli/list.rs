//! `vkube list`.

use clap::Args;

#[derive(Args, Debug)]
pub struct ListArgs {}

impl ListArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        anyhow::bail!("vkube list is not implemented yet")
    }
}
