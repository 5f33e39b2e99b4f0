fn main() -> anyhow::Result<()> {
    medmine::device::tune_allocator();
    medmine::cli::run()
}
