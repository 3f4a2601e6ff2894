package CatApp::Schema::Result::Note;
use strict;
use warnings;
use base 'DBIx::Class::Core';

__PACKAGE__->table('note');
__PACKAGE__->add_columns(id => { data_type => 'integer', is_auto_increment => 1 }, body => { data_type => 'text' });
__PACKAGE__->set_primary_key('id');

1;
