"""What the host agent, the gateway and the Jupyter extension agree on, in one place (`wire`:
limits, shapes and kernelspec names, kernel states, the time format, the v1 websocket codec),
and the `gpupool` command (`cli`). The three packages import this one and never each other;
this one imports none of them."""
