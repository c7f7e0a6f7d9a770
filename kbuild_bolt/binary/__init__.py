"""The binary model: functions, decoded code, basic blocks and the CFG."""
