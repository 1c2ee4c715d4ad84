"""A scripted tmux for the mirror's planners: it answers the commands a plan yields."""

from __future__ import annotations

from tether.mirror.plan import DONE, ClosePane, Command, Effect, OpenPane, Plan, Result


class FakeTmux:
    """Answers like tmux would: new panes get fresh ids and ttys; ``fail`` makes
    commands starting with one of its prefixes fail; ``effects`` records all."""

    def __init__(self) -> None:
        self.effects: list[Effect] = []
        self.next_window = 10
        self.next_pane = 100
        self.fail: tuple[str, ...] = ()
        self.keys: dict[str, list[str]] = {}
        self.clients: list[str] = []

    def answer(self, effect: Effect) -> Result:
        self.effects.append(effect)
        if isinstance(effect, OpenPane | ClosePane):
            return DONE
        line = effect.line
        if self.fail and line.startswith(self.fail):
            return Result(False, ("failed",))
        if line.startswith("new-window"):
            self.next_window += 1
            self.next_pane += 1
            p = self.next_pane
            return Result(True, (f"@{self.next_window} %{p} /dev/pts/{p}",))
        if line.startswith("split-window"):
            self.next_pane += 1
            return Result(True, (f"%{self.next_pane} /dev/pts/{self.next_pane}",))
        if line.startswith("list-keys -T "):
            return Result(True, tuple(self.keys.get(line.split()[-1], [])))
        if line.startswith("list-windows"):
            return Result(True, ("@0",))
        if line.startswith("list-clients"):
            return Result(True, tuple(self.clients))
        return DONE

    def drive(self, plan: Plan) -> list[Effect]:
        """Run ``plan`` to its end; the effects it yielded."""
        start = len(self.effects)
        result: Result | None = None
        while True:
            try:
                effect = plan.send(result) if result is not None else next(plan)
            except StopIteration:
                return self.effects[start:]
            result = self.answer(effect)

    def lines(self, plan: Plan) -> list[str]:
        """Run ``plan``; its tmux command lines only."""
        return [e.line for e in self.drive(plan) if isinstance(e, Command)]
