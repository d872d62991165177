"""Decoding-time alignment: best-of-n (plain and calibrated), BoNBoN data, ARGS, DeAL, Transfer Q*.

Every method takes any Reward and returns a DecodeResult: the responses, their rewards and the compute spent."""
