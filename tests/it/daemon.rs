//! The daemon, through the real binary: jobs, overlap, clusters, outages, shutdown.
