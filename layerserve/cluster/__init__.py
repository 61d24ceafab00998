"""Scale-out on Ray Serve (`layerserve serve --replicas N`): one ingress deployment in front of N
engine replicas, routed by session and prefix affinity. Only `launch`, `ingress`, `replica` and
`router` import Ray; `route`, `affinity`, `relay` and `merge` are plain Python (and unit-tested so)."""
