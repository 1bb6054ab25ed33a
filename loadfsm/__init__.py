"""loadfsm: layer-by-layer weight loading where every layer is a state machine."""
