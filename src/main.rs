fn main() -> anyhow::Result<()> {
    medmine::device::tune_allocator();
    medmine::device::settle_thread_count();
    medmine::cli::run()
}
