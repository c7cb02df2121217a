"""The form: name, age, confirmation; the sign-up is saved in the bot's own table."""

from __future__ import annotations

from aiogram import Dispatcher, F, Router
from aiogram.filters import Command, CommandStart
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import Message
from sqlalchemy.ext.asyncio import AsyncEngine

from sessions_sql.aiogram import SQLStorage

from .models import Signup


class Form(StatesGroup):
    name = State()
    age = State()
    confirm = State()


async def start(message: Message, state: FSMContext) -> None:
    await state.clear()
    await state.set_state(Form.name)
    await message.answer("What is your name?")


async def cancel(message: Message, state: FSMContext) -> None:
    await state.clear()
    await message.answer("Cancelled.")


async def got_name(message: Message, state: FSMContext) -> None:
    await state.update_data(name=message.text)
    await state.set_state(Form.age)
    await message.answer(f"How old are you, {message.text}?")


async def got_age(message: Message, state: FSMContext) -> None:
    data = await state.update_data(age=int(message.text or 0))
    await state.set_state(Form.confirm)
    await message.answer(f"Sign up {data['name']}, {data['age']}? (yes/no)")


async def bad_age(message: Message) -> None:
    await message.answer("Please send your age as a number.")


async def confirmed(message: Message, state: FSMContext, engine: AsyncEngine) -> None:
    data = await state.get_data()
    assert message.from_user is not None
    async with engine.begin() as conn:
        await conn.execute(
            Signup.__table__.insert().values(
                telegram_user_id=message.from_user.id, name=data["name"], age=data["age"]
            )
        )
    await state.clear()
    await message.answer(f"Signed up {data['name']}, {data['age']}.")


async def declined(message: Message, state: FSMContext) -> None:
    await state.clear()
    await message.answer("Cancelled.")


def build_dispatcher(storage: SQLStorage, engine: AsyncEngine) -> Dispatcher:
    """The bot's dispatcher: FSM in ``storage``, handlers of one user one at a time (across
    processes on PostgreSQL), the application's engine passed to the handlers."""
    router = Router()
    router.message.register(start, CommandStart())
    router.message.register(cancel, Command("cancel"))
    router.message.register(got_name, Form.name, F.text)
    router.message.register(got_age, Form.age, F.text.regexp(r"^\d{1,3}$"))
    router.message.register(bad_age, Form.age)
    router.message.register(confirmed, Form.confirm, F.text.lower() == "yes")
    router.message.register(declined, Form.confirm)
    dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
    dp["engine"] = engine
    dp.include_router(router)
    return dp
