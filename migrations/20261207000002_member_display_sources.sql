-- Only active members follow user.updated (issue 19 item 13).
--
-- A removed membership row kept taking a departed user's new email and names, so
-- a former workspace kept learning them. Now a row's display fields are the
-- standing source among the membership's own snapshot and the user's
-- user.updated snapshots whose version is not after the membership's end (all of
-- them while it is active). An end that arrives after a newer user.updated was
-- applied makes the row fall back to the best source not after the end, which
-- needs what an overwrite lost: the snapshot's own display fields on the row, and
-- every user.updated of the user.

-- The display fields of the membership snapshot the row's data came from
-- (`source_version`, `source_event`); null for a row holding no snapshot.
alter table members add column snapshot_email text;
alter table members add column snapshot_first_name text;
alter table members add column snapshot_last_name text;
alter table members add column snapshot_image_url text;

-- Rows written before: where the display came from the membership snapshot this is
-- exact; where a user.updated had overwritten it, the snapshot's own fields are
-- lost and the row's current fields stand in for them (so a fallback shows what
-- the row showed, never nothing).
update members
set snapshot_email = email, snapshot_first_name = first_name,
    snapshot_last_name = last_name, snapshot_image_url = image_url
where source_version <> 0 or source_event is not null;

-- Every user.updated applied, by user (internal; `users` keeps the standing one).
create table user_profiles (
    user_id text not null,
    -- `data.updated_at` (ms) of the snapshot.
    version bigint not null,
    -- Svix id that carried it (ties of equal versions go to the smaller, in byte order).
    svix_id text not null,
    email text,
    first_name text,
    last_name text,
    image_url text,
    primary key (user_id, version, svix_id)
);

-- What `users` knows (its standing snapshot, when its svix id was kept).
insert into user_profiles (user_id, version, svix_id, email, first_name, last_name, image_url)
select id, source_version, source_event, email, first_name, last_name, image_url
from users
where source_version is not null and source_event is not null;
