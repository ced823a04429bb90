"""The README's screenshots of the terminal UI: Textual's own SVG export of each main screen, taken headless.

    APPLIANCE_HOME=~/appliance-demo APPLIANCE_PASSPHRASE_FILE=pass.txt python docs/screenshots/take.py [OUT]

Point it at a workspace `appliance demo` has made (a vault, the embedded model, one trained, evaluated and
exported run): the screens then show real figures. The hardware is the `2x-rtx4090` profile (the title says
"simulated"), so the Hardware and Plan screens show two GPUs on any machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SIZE = (100, 32)


async def settle(pilot, seconds: float = 60) -> None:
    from textual.worker import WorkerState

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        await pilot.pause(0.1)
        if not any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) and w.name != "follow"
                   and not type(w.node).__name__ == "DirectoryTree" for w in pilot.app.workers):
            break
    await pilot.pause(0.3)


async def take(out: Path) -> None:
    from appliance.trust import keys
    from appliance.trust import keyring
    from tui.app import ApplianceApp

    passphrase = Path(os.environ["APPLIANCE_PASSPHRASE_FILE"]).read_text().strip()
    keys.use_vault(keyring.unlock(passphrase))
    app = ApplianceApp(simulate="2x-rtx4090", sample_interval=0.1)
    async with app.run_test(size=SIZE) as pilot:
        async def shot(name: str) -> None:
            await settle(pilot)
            app.save_screenshot(filename=f"{name}.svg", path=str(out))
            print(f"{out / name}.svg")

        await settle(pilot)
        await shot("home")
        await pilot.press("alt+2")
        await pilot.pause(4)  # a few dozen samples for the sparklines
        await shot("hardware")
        await pilot.press("alt+4")
        await settle(pilot)
        await pilot.press("b")
        await shot("data")
        await pilot.press("alt+5")
        await settle(pilot)
        recipe = app.query_one("#recipe")
        recipe.value = "recipes/qwen2.5-14b-qlora-2x24gb.yaml"
        await pilot.press("p")
        await shot("plan")
        await pilot.press("alt+6")
        await settle(pilot)
        app.query_one("#runs").focus()
        await pilot.press("enter")
        await pilot.pause(2)
        await shot("train")
        await pilot.press("alt+7")
        await settle(pilot)
        await shot("eval")
        await pilot.press("alt+8")
        await settle(pilot)
        app.query_one("#ex-tabs").active = "ex-results-tab"
        await shot("export")
        await pilot.press("alt+9")
        await settle(pilot)
        await pilot.press("ctrl+b")  # side by side with the base model
        await settle(pilot)
        prompt = app.query_one("#prompt")
        prompt.focus()
        prompt.value = "Convert this record to JSON: Ada Weber, 41, baker in Graz."
        await pilot.press("enter")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 600
        await pilot.pause(1)
        while app.query_one("ChatScreen").busy and loop.time() < deadline:
            await pilot.pause(0.5)
        await shot("chat")
        await pilot.press("alt+0")
        await shot("audit")
        await pilot.press("alt+g")
        await shot("doctor")
        await pilot.press("question_mark")
        await shot("help")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    asyncio.run(take(target))
