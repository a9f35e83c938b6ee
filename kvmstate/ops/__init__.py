"""Operations on a spec and a plan that commands run, apart from how they are shown."""
