//! The chained CNI plugin and the protocol it speaks with the agent.
