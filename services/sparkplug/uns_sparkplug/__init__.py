"""``uns run sparkplug`` (the namespace as a Sparkplug B 3.0 edge node, for Ignition's MQTT
Engine and every Sparkplug host) and ``uns run sparkplug-adapter`` (Sparkplug edge nodes
into the namespace as raw data). See the README's "Sparkplug B" section."""
