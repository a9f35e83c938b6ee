"""Operations around a run, apart from how they are shown: the run lock and the cluster lock,
the run journal and drift metrics, and the decisions of drift and evacuate."""
