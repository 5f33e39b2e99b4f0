fn main() -> anyhow::Result<()> {
    medmine::cli::run()
}
