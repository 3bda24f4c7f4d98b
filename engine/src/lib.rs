pub mod plan;
pub mod topology;
pub mod value;
